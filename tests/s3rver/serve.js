// Start a signature-checking S3 server on a free loopback port: `node serve.js DIRECTORY BUCKET`.
// Prints the port on stdout once it listens. (The package ships no command of its own.)
const S3rver = require('@20minutes/s3rver');

const [directory, bucket] = process.argv.slice(2);
new S3rver({ address: '127.0.0.1', port: 0, directory, silent: true, configureBuckets: [{ name: bucket, configs: [] }] })
  .run()
  .then(({ port }) => console.log(port))
  .catch((error) => {
    console.error(`s3rver: ${error.message}`);
    process.exit(1);
  });
