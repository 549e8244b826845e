"""`imagepipe keys set/list` on the stack from template.yaml (moto): keys are merged into the stack's
secret, one name at a time, and no value is ever printed."""

from __future__ import annotations

import json


def stored(pipeline) -> dict[str, str]:
    secret = pipeline.stack.outputs["ProviderKeysSecretName"]
    return json.loads(pipeline.client("secretsmanager").get_secret_value(SecretId=secret)["SecretString"])


def test_set_adds_a_key_and_keeps_the_others_without_printing_it(pipeline, cli, monkeypatch):
    # Given a stack whose secret holds the Atlas Cloud key, and a user with an OpenAI key exported
    before = stored(pipeline)
    assert before.get("ATLASCLOUD_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-users-own")

    # When they store it
    code, out, err = cli("keys", "set", "OPENAI_API_KEY")

    # Then the secret holds both, the output names the key but never shows a value
    assert code == 0, err
    assert stored(pipeline) == {**before, "OPENAI_API_KEY": "sk-the-users-own"}
    assert "stored OPENAI_API_KEY" in out and "kept" in out and "ATLASCLOUD_API_KEY" in out
    assert "sk-the-users-own" not in out + err
    assert before["ATLASCLOUD_API_KEY"] not in out + err


def test_a_key_not_in_the_environment_is_read_from_stdin_and_replaces_the_old_value(
    pipeline, cli, monkeypatch
):
    monkeypatch.delenv("ATLASCLOUD_API_KEY", raising=False)
    before = stored(pipeline)

    code, out, err = cli("keys", "set", "ATLASCLOUD_API_KEY", stdin="apikey-rotated\n")

    assert code == 0, err
    assert stored(pipeline) == {**before, "ATLASCLOUD_API_KEY": "apikey-rotated"}
    assert "apikey-rotated" not in out + err


def test_an_unknown_name_or_an_empty_value_changes_nothing_and_says_why(pipeline, cli, monkeypatch):
    before = stored(pipeline)
    monkeypatch.delenv("QIANFAN_API_KEY", raising=False)

    unknown = cli("keys", "set", "OPENAI_KEY")
    empty = cli("keys", "set", "QIANFAN_API_KEY", stdin="\n")

    assert unknown[0] == 2 and "unknown key name OPENAI_KEY" in unknown[2] and "OPENAI_API_KEY" in unknown[2]
    assert empty[0] == 2 and "no value for QIANFAN_API_KEY" in empty[2]
    assert stored(pipeline) == before


def test_list_shows_the_names_only(pipeline, cli):
    keys = stored(pipeline)

    code, out, err = cli("keys", "list")

    assert code == 0, err
    assert all(name in out for name in keys)
    assert not any(value in out for value in keys.values())
