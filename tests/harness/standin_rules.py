"""The stand-in API's rules as functions (no state, no I/O): status documents, merge patch
(RFC 7386), the strategic merge of a Node (conditions by ``type``), JSON patch (RFC 6902),
label and field selectors. Used by :mod:`tests.harness.kube_standin`."""

from __future__ import annotations

import copy
import re
import time
from typing import Any

JSON = dict[str, Any]

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiFailure(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")


def status_doc(code: int, message: str, reason: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also strategic merge for maps: null deletes, lists replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives ($patch, $retainKeys): not modelled
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def merge_conditions(current: Any, patch: Any) -> Any:
    """Strategic merge of a ``conditions`` list (patchMergeKey ``type``): each patch entry
    updates the condition of its type (or is appended); ``$patch: delete`` removes it."""
    result = [copy.deepcopy(c) for c in current or [] if isinstance(c, dict)]
    for entry in patch or []:
        if not isinstance(entry, dict):
            raise ApiFailure(400, "a condition must be an object")
        kind = entry.get("type")
        index = next((i for i, c in enumerate(result) if c.get("type") == kind), None)
        if entry.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append({k: v for k, v in entry.items() if v is not None})
        else:
            result[index] = merge_patch(result[index], entry)
    return result


def strategic_node_patch(current: JSON, patch: JSON) -> JSON:
    """Strategic merge for a Node: as :func:`merge_patch`, but ``status.conditions`` merge by
    ``type`` (the only list merge kwasm-py relies on)."""
    conditions = ((patch.get("status") or {}) if isinstance(patch.get("status"), dict) else {}).get(
        "conditions"
    )
    new = merge_patch(current, patch)
    if conditions is not None:
        new.setdefault("status", {})["conditions"] = merge_conditions(
            (current.get("status") or {}).get("conditions"), conditions
        )
    return new


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiFailure(422, f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        elif isinstance(doc, dict):
            doc = doc[p]
        else:
            raise KeyError(p)
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, test, move, copy."""
    if not isinstance(ops, list):
        raise ApiFailure(400, "a JSON patch must be a list")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _resolve(doc, parts) != op.get("value"):
                    raise ApiFailure(422, f"test failed at {op.get('path')}")
                continue
            if kind in ("move", "copy"):
                from_parts = _pointer(op.get("from", ""))
                value = copy.deepcopy(_resolve(doc, from_parts))
                if kind == "move":
                    doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
                doc = json_patch(doc, [{"op": "add", "path": op["path"], "value": value}])
                continue
            if not parts:
                if kind in ("add", "replace"):
                    doc = copy.deepcopy(op.get("value"))
                    continue
                raise ApiFailure(422, "cannot remove the root")
            parent = _resolve(doc, parts[:-1])
            last = parts[-1]
            if kind == "add":
                if isinstance(parent, list):
                    idx = len(parent) if last == "-" else int(last)
                    parent.insert(idx, copy.deepcopy(op.get("value")))
                else:
                    parent[last] = copy.deepcopy(op.get("value"))
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op.get("value"))
                else:
                    if last not in parent:
                        raise KeyError(last)
                    parent[last] = copy.deepcopy(op.get("value"))
            else:
                raise ApiFailure(400, f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as ex:
            raise ApiFailure(422, f"JSON patch {kind} {op.get('path')}: no such path") from ex
    return doc


# ---------------------------------------------------------------------------- selectors


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


_SET_RE = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$")


def label_match(labels: dict[str, str], selector: str) -> bool:
    for term in _split_top(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.split("=", 1))
            if labels.get(key) != value.lstrip("=").strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(obj: JSON, selector: str) -> bool:
    for term in _split_top(selector):
        neg = "!=" in term
        key, value = term.split("!=" if neg else "=", 1)
        value = value.lstrip("=")
        cur: Any = obj
        for part in key.strip().split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        actual = "" if cur is None else str(cur)
        if (actual == value) == neg:
            return False
    return True
