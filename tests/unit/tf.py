"""Terraform files as plain Python data, for structural assertions.

python-hcl2 keeps HCL's quotes in names and string literals and marks blocks with `__is_block__`;
strip both (and its `__comments__`) so a test reads `variables["kubernetes_version"]["default"] == "v1.34.0"`.
"""
from pathlib import Path
from typing import Any

import hcl2


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_unquote(k): _plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _unquote(value) if isinstance(value, str) else value


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def load_tf(path: Path) -> dict:
    with open(path) as f:
        return _plain(hcl2.load(f))


def blocks(tf: dict, kind: str) -> dict[str, dict]:
    """{name: body} of every `variable`/`output` block, or {type.name: body} of `resource`/`data`."""
    out = {}
    for entry in tf.get(kind, []):
        for name, body in entry.items():
            if kind in ("resource", "data"):
                for inner, inner_body in body.items():
                    out[f"{name}.{inner}"] = inner_body
            else:
                out[name] = body
    return out
