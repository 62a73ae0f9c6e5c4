"""Credentials as clients send them and as operators configure them: the Bearer scheme in any
case (RFC 9110 11.1), a signed URL's `exp` that is no number refused with a 400 that says so (it
was "bad request: ValueError"), whether the express lane or aiohttp's way answers; and secrets
anyone could guess refused at start, in one line that says what is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import wsi
from server.auth import EXPIRY_DIGITS, sign
from server.settings import (
    MIN_SIGNING_KEY_BYTES,
    MIN_TOKEN_CHARS,
    RANDOM_KEY_COMMAND,
    ServerSettings,
)

from .conftest import sample
from .helpers import run_wsi, serving_app

SECRET = "s3cret-for-the-scheme-tests"
TOKEN = f"reader:{SECRET}"
KEY = "signing-key-for-the-scheme-tests-0123456789"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("secrets")
    sid = wsi.convert_slide(
        sample("CMU-1-Small-Region.svs"), wsi.Store(wsi.StoreSettings(str(root)))
    ).slide_id
    return root, sid


@pytest.fixture(scope="module", params=[True, False], ids=["express", "aiohttp"])
def base(request: pytest.FixtureRequest, store: tuple[Path, str]) -> Iterator[str]:
    """A service with tokens (authentication on), the express lane on or off."""
    settings = ServerSettings(
        store=str(store[0]),
        tokens=(TOKEN,),
        signing_key=KEY,
        express=request.param,
        index_at_start=False,
    )
    with serving_app(settings) as (url, _, _):
        yield url


def get(url: str, **headers: str) -> requests.Response:
    """GET `url` twice: the first fills the caches the express lane answers from."""
    requests.get(url, headers=headers, timeout=60)
    return requests.get(url, headers=headers, timeout=60)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR", "Bearer  "])
def test_the_bearer_scheme_in_any_case(base: str, store: tuple[Path, str], scheme: str) -> None:
    tile = f"{base}/slides/{store[1]}/tiles/0/1/0"
    assert get(tile, Authorization=f"{scheme} {SECRET}").status_code == 200
    assert get(f"{base}/slides", Authorization=f"{scheme} {SECRET}").status_code == 200
    for wrong in (f"{scheme} {SECRET}x", f"Bearers {SECRET}", f"Basic {SECRET}", f"{SECRET}"):
        assert get(tile, Authorization=wrong).status_code == 401, wrong


def test_an_expiry_that_is_no_number_says_so(base: str, store: tuple[Path, str]) -> None:
    sid = store[1]
    tile = f"{base}/slides/{sid}/tiles/0/1/0"
    exp = int(time.time()) + 600
    assert get(f"{tile}?exp={exp}&sig={sign(KEY, 'tiles', sid, exp)}").status_code == 200
    for given, says in (
        ("1" * 5000, f"exp must be an integer of at most {EXPIRY_DIGITS} digits"),
        ("9" * (EXPIRY_DIGITS + 1), f"at most {EXPIRY_DIGITS} digits"),
        ("%D9%A1%D9%A2%D9%A3", "exp must be a non-negative integer in ASCII digits"),
        (f"0{exp}", "exp must be a non-negative integer in ASCII digits"),
    ):
        r = get(f"{tile}?exp={given}&sig=0123")
        assert r.status_code == 400, r.text[:200]
        assert says in r.json()["error"]
    assert get(f"{tile}?exp={exp}&sig=0123").status_code == 401  # a number, a bad signature
    assert get(f"{tile}?exp=&sig=0123").status_code == 401  # no expiry: no signed URL


SHORT_KEYS = ["k", " ", " " * 40, "\t" * 32 + " ", "k" * (MIN_SIGNING_KEY_BYTES - 1)]
SHORT_TOKENS = ["x", "reader:x", "reader:" + "x" * (MIN_TOKEN_CHARS - 1), " " * 20, "x:" + " " * 20]


@pytest.mark.parametrize("key", SHORT_KEYS)
def test_a_short_signing_key_is_refused(key: str) -> None:
    with pytest.raises(wsi.InvalidArgument) as caught:
        ServerSettings(host="0.0.0.0", tokens=(TOKEN,), signing_key=key)
    message = str(caught.value)
    assert f"WSI_SIGNING_KEY must be at least {MIN_SIGNING_KEY_BYTES} bytes" in message
    assert RANDOM_KEY_COMMAND in message


@pytest.mark.parametrize("token", SHORT_TOKENS)
def test_a_short_token_is_refused_without_showing_it(token: str) -> None:
    with pytest.raises(wsi.InvalidArgument) as caught:
        ServerSettings(host="0.0.0.0", tokens=(TOKEN, token), signing_key=KEY)
    message = str(caught.value)
    assert f"at least {MIN_TOKEN_CHARS} characters" in message and RANDOM_KEY_COMMAND in message
    secret = token.partition(":")[2] or token
    assert secret.strip() == "" or secret not in message.replace(RANDOM_KEY_COMMAND, "")


def test_secrets_long_enough_are_taken() -> None:
    """The least each takes, and keys and tokens as the suggested command makes them; a key
    counts in bytes (a key of 11 three-byte characters is 33 bytes)."""
    for key in ("k" * MIN_SIGNING_KEY_BYTES, "\u20ac" * 11, "K-9s" * 11):
        for token in ("t" * MIN_TOKEN_CHARS, "lab:" + "t" * MIN_TOKEN_CHARS):
            settings = ServerSettings(host="0.0.0.0", tokens=(token,), signing_key=key)
            assert settings.requires_auth
    assert ServerSettings().signing_key == ""  # none on loopback without tokens: not checked


def test_read_and_pixel_tokens_are_held_to_the_same_rules() -> None:
    """A read or pixel token alone turns authentication on (it needs the signing key, on
    loopback too), is refused short, and a secret given under two roles is refused: which
    role would it have?"""
    for field in ("read_tokens", "pixel_tokens"):
        given: dict[str, Any] = {field: (TOKEN,)}
        assert ServerSettings(**given, signing_key=KEY).requires_auth
        with pytest.raises(wsi.InvalidArgument, match="needs WSI_SIGNING_KEY"):
            ServerSettings(**given)
        variable = f"WSI_{field.upper()}"
        short: dict[str, Any] = {field: ("x:short",)}
        with pytest.raises(wsi.InvalidArgument, match=f"{variable}: the secret of token x"):
            ServerSettings(**short, signing_key=KEY)
        twice: dict[str, Any] = {field: (f"other:{SECRET}",)}
        with pytest.raises(wsi.InvalidArgument, match=f"{variable}: .* is given twice") as caught:
            ServerSettings(tokens=(TOKEN,), **twice, signing_key=KEY)
        assert SECRET not in str(caught.value)


def test_serve_refuses_guessable_secrets_in_one_line(tmp_path: Path) -> None:
    """`WSI_HOST=0.0.0.0 WSI_TOKENS=x WSI_SIGNING_KEY=' ' wsi serve`: it started, with a
    one-space HMAC key and a one-character token."""
    env: dict[str, Any] = {**os.environ, "WSI_HOST": "0.0.0.0", "WSI_TOKENS": "x"}
    for key, says in ((" ", "WSI_SIGNING_KEY"), (KEY, "WSI_TOKENS")):
        done = run_wsi("serve", "--store", str(tmp_path), env={**env, "WSI_SIGNING_KEY": key})
        assert done.returncode == 1 and "serving" not in done.stdout
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"wsi: error: {says}")
        assert RANDOM_KEY_COMMAND in done.stderr


def test_a_setting_spelt_wrong_is_refused_in_one_line(tmp_path: Path) -> None:
    """`WSI_TOKEN=... wsi serve` (one letter short of WSI_TOKENS) started on loopback without
    authentication, the token ignored without a word: behind a proxy that forwards as
    `Host: 127.0.0.1`, every slide was open. A `WSI_*` name that all but spells a setting is now
    refused at start, naming the setting meant and never the value; other `WSI_*` names, a
    deployment's own, are left alone."""
    secret = "a-token-nobody-may-see-0123456789"
    for name, meant in (("WSI_TOKEN", "WSI_TOKENS"), ("WSI_SIGNINGKEY", "WSI_SIGNING_KEY")):
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--store", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,  # a service that starts would run until stopped
            check=False,
            env={**os.environ, name: secret},
        )
        assert (done.returncode, done.stdout) == (1, ""), (name, done.stdout)
        assert done.stderr == (
            f"wsi: error: {name} is not a setting; did you mean {meant}? (a setting spelt "
            "otherwise is not applied)\n"
        )
    assert (
        ServerSettings.from_env({"WSI_DEPLOYMENT_NAME": "lab-3", "WSI_PORT": "8001"}).port == 8001
    )


@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_a_signed_url_lifetime_under_one_second_is_refused(seconds: str) -> None:
    """`WSI_SIGNED_URL_SECONDS=0` (or negative) was taken: every link the viewer signed had
    expired when it was made, so a page opened and each of its tiles answered 401."""
    with pytest.raises(
        wsi.InvalidArgument, match=f"WSI_SIGNED_URL_SECONDS must be at least 1, got {seconds}"
    ):
        ServerSettings.from_env({"WSI_SIGNED_URL_SECONDS": seconds})
