"""The reward API key, as the servers, the trainer's client and the CLIs read it: from the file that
$GD2PO_REWARD_API_KEY_FILE names, else from $GD2PO_REWARD_API_KEY. Never from a flag: a process's argv
is readable by anyone on its node (`ps`) for as long as it runs. And when a server needs one: beyond loopback."""

import argparse
import ipaddress
import os

API_KEY_ENV = "GD2PO_REWARD_API_KEY"
API_KEY_FILE_ENV = "GD2PO_REWARD_API_KEY_FILE"
MAX_KEY_FILE_BYTES = 4096  # a key is tens of bytes; more is the wrong file


class ApiKeyError(ValueError):
    pass


def read_api_key() -> str | None:
    """The key, or None when neither variable is set. The file wins over $GD2PO_REWARD_API_KEY when both
    are set (a Ray worker may inherit the key variable from the shell that started its node), and its
    surrounding whitespace is dropped (`echo KEY > file` ends it in a newline). A set but empty variable,
    or a missing, unreadable or empty file, is an error: not a silent "no authentication"."""
    path = os.environ.get(API_KEY_FILE_ENV)
    if path is not None:
        try:
            with open(path, "rb") as file:
                key = file.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as error:
            raise ApiKeyError(f"${API_KEY_FILE_ENV}={path}: cannot read the key file ({error.strerror})") from None
        if len(key) > MAX_KEY_FILE_BYTES:
            raise ApiKeyError(f"${API_KEY_FILE_ENV}={path}: over {MAX_KEY_FILE_BYTES} bytes, not a key file")
        key = key.decode(errors="replace").strip()
        if not key:
            raise ApiKeyError(f"${API_KEY_FILE_ENV}={path}: the key file is empty")
        return key
    key = os.environ.get(API_KEY_ENV)
    if key == "":
        raise ApiKeyError(f"${API_KEY_ENV} is set but empty: give a key, or leave it unset")
    return key


def check_exposure(parser: argparse.ArgumentParser, args: argparse.Namespace, host: str, where: str) -> None:
    """A server reachable from other machines (at `host`, which `where` names) needs a key unless the
    user says otherwise."""
    if args.api_key is None and not is_loopback(host) and not args.allow_unauthenticated:
        parser.error(
            f"{where} {host} is reachable from other machines: set ${API_KEY_FILE_ENV} (a file holding the "
            f"key) or ${API_KEY_ENV}, or pass --allow-unauthenticated"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface
