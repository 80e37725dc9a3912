"""Endpoint names: `namespace.component.endpoint`, each part a NATS-safe token."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InvalidName(ValueError):
    pass


def validate_token(value: str, what: str = "name part") -> str:
    if not _TOKEN.match(value or ""):
        raise InvalidName(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '-' or '_' "
            "(dots, spaces, '*' and '>' have meaning in NATS subjects)"
        )
    return value


@dataclass(frozen=True)
class EndpointName:
    namespace: str
    component: str
    endpoint: str

    def __post_init__(self) -> None:
        validate_token(self.namespace, "namespace")
        validate_token(self.component, "component")
        validate_token(self.endpoint, "endpoint")

    @classmethod
    def parse(cls, text: str) -> EndpointName:
        parts = text.split(".")
        if len(parts) != 3:
            raise InvalidName(f"invalid endpoint {text!r}: expected namespace.component.endpoint")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"
