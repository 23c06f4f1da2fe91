"""`media-retention apikey`: create shows the token once, list never shows a secret, revoke is recorded."""

from __future__ import annotations

import json


def test_create_prints_the_token_once_and_list_never_shows_its_secret(cli):
    """The token appears in create's output only; listings name the key id, org and name."""
    assert cli("org", "set", "acme").code == 0
    created = cli("apikey", "create", "--org", "acme", "--name", "billing app", "--json")
    assert created.code == 0
    key = created.json
    assert key["token"].startswith(f"mrk_{key['id']}_") and key["active"] is True
    secret = key["token"].split("_", 2)[2]

    for args in (("apikey", "list"), ("apikey", "list", "--json"), ("apikey", "list", "--org", "acme", "--json")):
        listed = cli(*args)
        assert listed.code == 0 and key["id"] in listed.stdout
        assert secret not in listed.stdout + listed.stderr
    [entry] = [json.loads(line) for line in cli("apikey", "list", "--json").stdout.splitlines()]
    assert (entry["org"], entry["name"], entry["active"]) == ("acme", "billing app", True)
    assert "token" not in entry

    text = cli("apikey", "create", "--org", "acme")
    assert "token: mrk_k" in text.stdout and "not shown again" in text.stderr


def test_revoke_marks_the_key_revoked_and_is_idempotent(cli):
    """A revoked key is listed as revoked; revoking it again changes nothing and succeeds."""
    cli("org", "set", "acme")
    key_id = cli("apikey", "create", "--org", "acme", "--json").json["id"]
    first = cli("apikey", "revoke", key_id, "--by", "alice", "--json")
    assert first.code == 0 and first.json["active"] is False and first.json["revoked_at"]
    again = cli("apikey", "revoke", key_id, "--json")
    assert again.code == 0 and again.json["revoked_at"] == first.json["revoked_at"]
    [entry] = [json.loads(line) for line in cli("apikey", "list", "--json").stdout.splitlines()]
    assert entry["active"] is False


def test_bad_apikey_input_is_one_sentence_and_the_contract_exit_code(cli):
    """Unknown org or key: exit 3; a malformed key id or an empty name: exit 2; nothing is created."""
    cli("org", "set", "acme")
    unknown_org = cli("apikey", "create", "--org", "nobody")
    assert unknown_org.code == 3 and "does not exist" in unknown_org.stderr
    assert cli("apikey", "create", "--org", "acme", "--name", " ").code == 2
    assert cli("apikey", "revoke", "not-a-key").code == 2
    assert cli("apikey", "revoke", "k" + "0" * 16).code == 3
    assert cli("apikey", "list", "--json").stdout == ""
