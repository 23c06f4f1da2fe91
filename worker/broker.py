"""The embedded broker: kombu's filesystem transport, with every message whole before it can be read.

kombu's filesystem transport writes a message by creating `<time>_<uuid>.<queue>.msg` in the queue
directory and then writing into it, while a consumer takes any `*.<queue>.msg` it lists, renames it
away and reads it. A consumer that lists the directory between the create and the write reads an empty
file, and the worker stops on the JSONDecodeError ("Unrecoverable error"). Beat and the worker of
`media-retention run` share the directory; at a 1-second sweep interval the suite's run test hit it
under load (kombu issue #1551 reports the same error, still open). Here a message is written under a
name the consumer skips (`….msg.part`) and renamed into place, which POSIX makes atomic: a consumer
sees a message whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

# Not `<queue>.msg`: kombu's `_get` takes only names whose part after the first dot is exactly that.
PARTIAL_SUFFIX = ".part"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put `payload` onto `queue`: written to a partial file, then renamed to the name consumers read."""
        # The name kombu gives it (milliseconds first, so consumers take messages in order).
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


# What Celery's `broker_transport` names for the embedded broker (kombu resolves "module:Class").
TRANSPORT = f"{__name__}:Transport"
