"""The python-calculator tool, evaluated safely.

The assistant writes ``<|python_start|>expr<|python_end|>``; the engine asks :func:`use_calculator`
for the value and injects it as ``<|output_start|>value<|output_end|>``. nanochat ``eval``'s a
character-filtered string; we never ``eval``: the expression is parsed with :mod:`ast` and only
a whitelist of nodes is interpreted. Accepted: int/float literals, ``+ - * / // % **`` with
bounded sizes, unary ``+``/``-``, parentheses, and ``"text".count("sub")``. Anything else (names,
attributes, other calls, subscripts, comprehensions, huge powers) yields ``None``: no injection.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPR_CHARS = 1000
MAX_INT_BITS = 512  # numbers beyond ~1e154 are refused (keeps big-int arithmetic cheap)
MAX_EXPONENT = 512
MAX_RESULT_CHARS = 64  # the result is injected as tokens; keep it short
MAX_STR_CHARS = 10_000

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


class _Refused(Exception):
    """The expression is outside the calculator's language."""


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused("not a number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("non-finite float")
    return value


def _check_pow(base: int | float, exp: int | float) -> None:
    if abs(exp) > MAX_EXPONENT:
        raise _Refused("exponent too large")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and base.bit_length() * exp > MAX_INT_BITS:
        raise _Refused("power too large")


def _eval(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            if len(node.value) > MAX_STR_CHARS:
                raise _Refused("string too long")
            return node.value
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _number(_UNARY[type(node.op)](_number(_eval(node.operand))))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _number(_eval(node.left)), _number(_eval(node.right))
        if isinstance(node.op, ast.Pow):
            _check_pow(left, right)
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Refused("product too large")
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, complex):
            raise _Refused("complex result")
        return _number(result)
    if isinstance(node, ast.Call):
        return _eval_count(node)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _eval_count(node: ast.Call) -> int:
    """``"literal".count("literal")``: the only call the calculator knows."""
    func = node.func
    if not (
        isinstance(func, ast.Attribute) and func.attr == "count" and isinstance(func.value, ast.Constant)
    ):
        raise _Refused("only str.count calls are allowed")
    if node.keywords or len(node.args) != 1:
        raise _Refused("count takes exactly one argument")
    text, sub = _eval(func.value), _eval(node.args[0])
    if not isinstance(text, str) or not isinstance(sub, str):
        raise _Refused("count works on string literals only")
    return text.count(sub)


def use_calculator(expr: str) -> int | float | None:
    """Value of a calculator expression, or ``None`` when it is refused or fails."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # "1,234 * 2": thousands separators, as the reference does
    else:
        expr = _DIGIT_COMMA.sub("", expr)
    try:
        tree = ast.parse(expr, mode="eval")
        value = _eval(tree)
    except (
        _Refused,
        SyntaxError,
        ValueError,
        ZeroDivisionError,
        OverflowError,
        TypeError,
        RecursionError,
        MemoryError,
    ):
        return None
    if isinstance(value, str) or len(format_result(value)) > MAX_RESULT_CHARS:
        return None  # a bare string is not a calculation; a huge number is no answer
    return value


def format_result(value: int | float) -> str:
    """How the result is written into the output tokens (``str`` like the reference)."""
    return str(value)
