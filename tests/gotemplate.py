"""A small interpreter of the part of Go's text/template that llmcore's Ollama templates use, for tests.

Supported (with Go's semantics, https://pkg.go.dev/text/template): text and ``{{ }}`` actions with ``{{-``/``-}}``
whitespace trimming; ``if``/``else if``/``else``/``end``; ``range PIPELINE`` (dot becomes the element); variables
declared with ``:=`` (scoped to their block) and assigned with ``=``; fields ``.Name`` of dot and ``$var.Name``;
double-quoted string and integer literals; parentheses; the built-ins ``print`` (operands joined, no spaces
between strings), ``eq`` and ``len``. Anything else raises, so a template using more than this cannot pass a
test by accident.
"""

from __future__ import annotations

import ast
import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|:=|=|\(|\)|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|\w+)')


def _parse_items(src: str) -> list:
    items, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    items.append(("text", src[pos:]))
    return items


def _tokens(action: str) -> list[str]:
    out, pos = [], 0
    while pos < len(action.rstrip()):
        m = _TOKEN.match(action, pos)
        if not m:
            raise ValueError(f"unsupported action syntax: {action!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


class _Scope:
    def __init__(self, parent=None):
        self.vars, self.parent = {}, parent

    def find(self, name):
        s = self
        while s is not None:
            if name in s.vars:
                return s
            s = s.parent
        raise NameError(f"undefined variable {name}")


def _truth(v) -> bool:
    return bool(v)  # Go: false, 0, nil, empty string/slice/map are false


class _Expr:
    def __init__(self, toks: list[str]):
        self.toks, self.i = toks, 0

    def parse(self):
        node = self._command()
        if self.i != len(self.toks):
            raise ValueError(f"unsupported expression: {' '.join(self.toks)}")
        return node

    def _command(self):
        args = []
        while self.i < len(self.toks) and self.toks[self.i] != ")":
            args.append(self._operand())
        if not args:
            raise ValueError("empty command")
        if isinstance(args[0], tuple) and args[0][0] == "ident":
            return ("call", args[0][1], args[1:])
        if len(args) != 1:
            raise ValueError(f"cannot call a non-function: {self.toks}")
        return args[0]

    def _operand(self):
        t = self.toks[self.i]
        self.i += 1
        if t == "(":
            node = self._command()
            if self.i >= len(self.toks) or self.toks[self.i] != ")":
                raise ValueError("unbalanced parenthesis")
            self.i += 1
            return node
        if t.startswith('"'):
            return ("lit", ast.literal_eval(t))  # Go's escapes used here (\n, \", \\) read the same in Python
        if t.startswith("$"):
            name, *fields = t.split(".")
            return ("var", name, fields)
        if t.startswith("."):
            return ("dot", [f for f in t.split(".") if f])
        if re.fullmatch(r"-?\d+", t):
            return ("lit", int(t))
        if re.fullmatch(r"\w+", t):
            return ("ident", t)
        raise ValueError(f"unsupported token {t!r}")


def _field(value, name):
    if isinstance(value, dict):
        if name not in value:
            raise KeyError(f"no field {name}")
        return value[name]
    return getattr(value, name)


def _eval(node, dot, scope):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "dot":
        v = dot
        for f in node[1]:
            v = _field(v, f)
        return v
    if kind == "var":
        v = scope.find(node[1]).vars[node[1]]
        for f in node[2]:
            v = _field(v, f)
        return v
    if kind == "call":
        args = [_eval(a, dot, scope) for a in node[2]]
        if node[1] == "print":
            out = ""
            for k, a in enumerate(args):  # Go's fmt.Sprint: a space between operands when neither is a string
                if k and not isinstance(a, str) and not isinstance(args[k - 1], str):
                    out += " "
                out += a if isinstance(a, str) else str(a)
            return out
        if node[1] == "eq":
            return any(args[0] == a for a in args[1:])
        if node[1] == "len":
            return len(args[0])
        raise ValueError(f"unsupported function {node[1]!r}")
    raise ValueError(f"cannot evaluate {node!r}")


def _build(items: list, i: int = 0, stop=("end",)):
    """Parse items into a tree; returns (nodes, index, terminator action)."""
    nodes = []
    while i < len(items):
        kind, value = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else") and word in stop:
            return nodes, i, value
        if word == "if":
            branches, cond = [], value[2:].strip()
            while True:
                body, i, term = _build(items, i, ("end", "else"))
                branches.append((cond, body))
                if term == "end":
                    break
                cond = term[4:].strip()  # "else if X" -> "if X"; plain "else" -> ""
                cond = cond[2:].strip() if cond.startswith("if") else None
            nodes.append(("if", [(None if c is None else _Expr(_tokens(c)).parse(), b) for c, b in branches]))
        elif word == "range":
            body, i, term = _build(items, i, ("end",))
            nodes.append(("range", _Expr(_tokens(value[5:])).parse(), body))
        elif word in ("end", "else"):
            raise ValueError(f"unexpected {{{{{value}}}}}")
        else:
            toks = _tokens(value)
            if len(toks) > 2 and toks[0].startswith("$") and toks[1] in (":=", "="):
                nodes.append(("set", toks[1], toks[0], _Expr(toks[2:]).parse()))
            else:
                nodes.append(("print", _Expr(toks).parse()))
    if stop:
        raise ValueError(f"missing {{{{end}}}} (expected one of {stop})")
    return nodes, i, None


def _run(nodes, dot, scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            v = _eval(node[1], dot, scope)
            out.append(v if isinstance(v, str) else str(v))
        elif kind == "set":
            _, op, name, expr = node
            value = _eval(expr, dot, scope)
            (scope if op == ":=" else scope.find(name)).vars[name] = value
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truth(_eval(cond, dot, scope)):
                    _run(body, dot, _Scope(scope), out)
                    break
        elif kind == "range":
            for element in _eval(node[1], dot, scope) or []:
                _run(node[2], element, _Scope(scope), out)


def render(template: str, data: dict) -> str:
    """Render ``template`` with ``data`` as dot (e.g. ``{"Messages": [{"Role": "user", "Content": "Hi"}]}``)."""
    nodes, i, term = _build(_parse_items(template), 0, ())
    if term is not None:
        raise ValueError(f"unexpected {{{{{term}}}}}")
    out: list[str] = []
    _run(nodes, data, _Scope(), out)
    return "".join(out)
