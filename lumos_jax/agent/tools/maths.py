"""Maths tools on sympy, offline stand-ins for the reference's WolframAlpha calls.

Arithmetic is exact (decimals are read as rationals); a result is shown the way the
reference's data shows WolframAlpha answers: integers plainly, a decimal when the input had
decimals or percentages (`1 - 25%` -> 0.75), a fraction otherwise (`1 - 2/5` -> 3/5), and
symbolic results over one denominator with implicit products (`40% * p` -> 2p/5).
`%` after a number is a percentage; `a % b` between operands is the remainder.
"""

from __future__ import annotations

import re
from tokenize import TokenError

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication, parse_expr, rationalize,
                                        standard_transformations)

from lumos_jax.agent.tools.base import BadArguments, Tool, ToolContext, ToolError, VARIABLE_RE, value_text

_TRANSFORMS = standard_transformations + (implicit_multiplication, convert_xor, rationalize)
_FUNCTIONS = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
              "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs, "Abs": sympy.Abs, "floor": sympy.floor,
              "ceil": sympy.ceiling, "ceiling": sympy.ceiling, "pi": sympy.pi, "factorial": sympy.factorial,
              "round": lambda x, n=0: sympy.Float(round(float(x), int(n))), "min": sympy.Min,
              "max": sympy.Max, "Mod": sympy.Mod, "gcd": sympy.gcd, "lcm": sympy.lcm,
              "binomial": sympy.binomial}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%(?!\s*[\d(.])")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
_NUMBER_IN_TEXT = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
MAX_TEXT = 2000


def _clean(text: str) -> str:
    s = text.strip().rstrip(".").strip()
    s = s.replace("$", "").replace("×", "*").replace("÷", "/").replace("−", "-").replace("≤", "<=")
    s = s.replace("≥", ">=").replace("≠", "!=")
    s = re.sub(r"%\s*of\b", "% *", s)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = _PERCENT.sub(r"(\1/100)", s)
    s = s.replace("%", " mod_op ")
    return s


def _decimal_mode(text: str) -> bool:
    return bool(re.search(r"\d\.\d|(?<![\d])\.\d|%", text))


def parse_math(text: str):
    """A sympy object for a formula, an equation (`a = b`) or a comparison."""
    if len(text) > MAX_TEXT:
        raise BadArguments(f"formula longer than {MAX_TEXT} characters")
    s = _clean(text)
    if not s:
        raise BadArguments("empty formula")
    if re.search(r"(?<![<>!=])=(?!=)", s):
        left, right = re.split(r"(?<![<>!=])=(?!=)", s, maxsplit=1)
        if "=" in right and not re.search(r"[<>!]=|==", right):
            raise BadArguments(f"more than one '=' in {text[:60]!r}")
        return sympy.Eq(_expr(left), _expr(right), evaluate=False)
    return _expr(s)


_POWER = re.compile(r"(?:\^|\*\*)\s*\(?\s*(\d+)")
_TOWER = re.compile(r"(?:\^|\*\*)\s*[\d.]+\s*(?:\^|\*\*)|(?:\^|\*\*)\s*\([^)]*(?:\^|\*\*)")
_FACTORIAL = re.compile(r"factorial\s*\(\s*(\d+)")
MAX_EXPONENT = 10_000


def _guard(s: str) -> None:
    """Refuse formulas whose exact evaluation would not finish (huge powers, towers)."""
    if any(int(m) > MAX_EXPONENT for m in _POWER.findall(s)) or _TOWER.search(s):
        raise BadArguments(f"exponent too large in {s[:60]!r} (limit {MAX_EXPONENT})")
    if any(int(m) > 2000 for m in _FACTORIAL.findall(s)):
        raise BadArguments("factorial argument too large (limit 2000)")
    if len(re.findall(r"\d", s)) > 400:
        raise BadArguments("too many digits in the formula")


def _expr(s: str):
    s = s.strip()
    if not s:
        raise BadArguments("empty side of an equation")
    _guard(s)
    if "mod_op" in s:
        parts = s.split("mod_op")
        if len(parts) == 2:
            return sympy.Mod(_expr(parts[0]), _expr(parts[1]))
        raise BadArguments("more than one '%' remainder")
    names = {n: sympy.Symbol(n) for n in _IDENT.findall(s) if n not in _FUNCTIONS}
    local = dict(_FUNCTIONS, **names)
    try:
        return parse_expr(s, local_dict=local, global_dict={"Integer": sympy.Integer, "Float": sympy.Float,
                                                            "Rational": sympy.Rational, "Symbol": sympy.Symbol},
                          transformations=_TRANSFORMS, evaluate=True)
    except (SyntaxError, TypeError, ValueError, AttributeError, ZeroDivisionError, TokenError) as e:
        raise BadArguments(f"cannot read formula {s[:80]!r} ({type(e).__name__})") from None


def format_value(value, decimal: bool = False) -> str:
    """A result as the reference's data writes it."""
    if isinstance(value, bool) or value in (sympy.true, sympy.false):
        return "True" if bool(value) else "False"
    if isinstance(value, sympy.Equality):
        return f"{format_value(value.lhs, decimal)} = {format_value(value.rhs, decimal)}"
    if isinstance(value, sympy.Basic) and value.is_Relational:
        return _pretty(str(value))
    value = sympy.sympify(value)
    if value.is_number:
        if value.is_real is False and value.is_complex:
            return _pretty(str(sympy.nsimplify(value)))
        v = sympy.nsimplify(value) if isinstance(value, sympy.Float) else value
        if v.is_Integer:
            return str(int(v))
        if v.is_Rational and not decimal:
            return f"{v.p}/{v.q}"
        try:
            f = float(v)
        except TypeError:
            return _pretty(str(v))
        if f == int(f) and abs(f) < 1e15:
            return str(int(f))
        return f"{f:.10g}" if "e" not in f"{f:.10g}" else repr(f)
    return _pretty(str(sympy.together(value)))


def _pretty(s: str) -> str:
    s = s.replace("**", "^")
    return re.sub(r"(\d)\*(?=[A-Za-z(])", r"\1", s)


def _as_math_text(value) -> str:
    """A variable's value as formula text: numbers are pulled out of prose answers."""
    text = value_text(value).strip().rstrip(".").strip()
    try:
        parse_math(text)
        return text
    except ToolError:
        pass
    nums = _NUMBER_IN_TEXT.findall(text)
    if nums:
        return nums[0].replace(",", "")
    low = text.lower()
    if low in ("true", "yes"):
        return "True"
    if low in ("false", "no"):
        return "False"
    raise BadArguments(f"value {text[:60]!r} is not a number or formula")


def substitute(args: str, ctx: ToolContext) -> str:
    """Reference rule: `R1(...)` and single-variable arguments substitute plainly; inside a
    formula each variable becomes `(value)`; equation values are combined side by side."""
    names = ctx.referenced(args)
    if not names:
        return args
    if re.fullmatch(r"\s*R\d+\s*", args):
        return _as_math_text(ctx.value(names[0]))
    return VARIABLE_RE.sub(lambda m: f"({_as_math_text(ctx.value(m.group(0)))})", args)


def _apply_function_call(args: str, ctx: ToolContext):
    """`R1(R2)` / `R1(a=1, b=2)`: R1's formula with the given values substituted."""
    m = re.fullmatch(r"\s*(R\d+)\s*\((.*)\)\s*", args, re.S)
    if not m:
        return None
    base = parse_math(_as_math_text(ctx.value(m.group(1))))
    inner = ctx.substitute(m.group(2), wrap=lambda v: v.strip().rstrip("."))
    subs = {}
    pieces = [p for p in re.split(r",|\band\b", inner) if p.strip()]
    free = sorted(base.free_symbols, key=lambda s: s.name)
    plain = []
    for p in pieces:
        if "=" in p:
            k, v = p.split("=", 1)
            subs[sympy.Symbol(k.strip())] = _expr(_clean(v))
        else:
            plain.append(_expr(_clean(p)))
    for sym, val in zip([s for s in free if s not in subs], plain):
        subs[sym] = val
    if not subs:
        raise BadArguments(f"nothing to substitute in {args[:60]!r}")
    out = base.subs(subs)
    return sympy.simplify(out) if not isinstance(out, sympy.Equality) else out


def evaluate(formula: str):
    """Evaluate a formula, an equation (sides simplified) or a comparison."""
    e = parse_math(formula)
    if isinstance(e, sympy.Equality):
        return sympy.Eq(sympy.simplify(e.lhs), sympy.simplify(e.rhs), evaluate=False)
    if isinstance(e, sympy.Basic) and e.is_Relational:
        return e
    return sympy.simplify(e) if e.free_symbols else sympy.nsimplify(e) if isinstance(e, sympy.Float) else e


def _combine_equations(args: str, ctx: ToolContext):
    """`R1 + R2` where the values are equations: apply the formula to each side."""
    names = ctx.referenced(args)
    vals = {n: value_text(ctx.value(n)) for n in names}
    if not any("=" in v and not re.search(r"[<>!]=|==", v) for v in vals.values()):
        return None
    sides = []
    for side in (0, 1):
        def repl(m, side=side):
            v = vals[m.group(0)].strip().rstrip(".")
            if "=" in v:
                v = v.split("=", 1)[side]
            return f"({v})"
        sides.append(VARIABLE_RE.sub(repl, args))
    return sympy.Eq(sympy.simplify(parse_math(sides[0])), sympy.simplify(parse_math(sides[1])), evaluate=False)


class Calculator(Tool):
    name = "Calculator"
    description = "Calculate the input formula"

    def __call__(self, args: str, ctx: ToolContext) -> str:
        func = _apply_function_call(args, ctx)
        if func is not None:
            return format_value(func, _decimal_mode(args) or _decimal_mode(ctx.substitute(args)))
        combined = _combine_equations(args, ctx)
        if combined is not None:
            return format_value(combined)
        formula = substitute(args, ctx)
        return format_value(evaluate(formula), _decimal_mode(formula))


class SetEquation(Tool):
    name = "SetEquation"
    description = "Set up an equation to be solved"

    def __call__(self, args: str, ctx: ToolContext) -> str:
        text = ctx.substitute(args, wrap=lambda v: v.strip().rstrip("."))
        for part in _split_system(text):
            parse_math(part)  # validate; the equation itself is the result
        return text.strip()


def _split_system(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r",\s*(?![^()]*\))|\band\b|;", text) if p.strip()]
    return parts or [text]


class SolveEquation(Tool):
    """One unknown -> its value; several -> one value per unknown (sorted by name), so
    `R5, R6 = SolveEquation(...)` assigns both. An expression without '=' is evaluated
    (the reference's data uses `SolveEquation(R2 + R4)` for a sum)."""

    name = "SolveEquation"
    description = "Solve the previous set equation"
    multi_output = True

    def __call__(self, args: str, ctx: ToolContext):
        text = substitute(args, ctx)
        parts = _split_system(text)
        eqs = [parse_math(p) for p in parts]
        if len(eqs) == 1 and not isinstance(eqs[0], sympy.Equality):
            e = eqs[0]
            if not getattr(e, "free_symbols", None):
                return format_value(evaluate(text), _decimal_mode(text))
            eqs = [sympy.Eq(e, 0)]
        eqs = [e if isinstance(e, sympy.Equality) else sympy.Eq(e, 0) for e in eqs]
        unknowns = sorted(set().union(*(e.free_symbols for e in eqs)), key=lambda s: s.name)
        if not unknowns:
            raise BadArguments(f"no unknowns in {text[:60]!r}")
        sol = sympy.solve(eqs, unknowns, dict=True)
        if not sol:
            raise ToolError(f"no solution for {text[:80]!r}")
        decimal = _decimal_mode(text)
        first = sol[0]
        values = [format_value(first[u], decimal) if u in first else u.name for u in unknowns]
        if len(unknowns) == 1 and len(sol) > 1:  # x = ±a: every root, as the reference's "a, -a"
            return ", ".join(format_value(s[unknowns[0]], decimal) for s in sol)
        return values[0] if len(values) == 1 else values


class SolveInequality(Tool):
    name = "SolveInequality"
    description = "Solve the previous set inequality"

    def __call__(self, args: str, ctx: ToolContext) -> str:
        text = substitute(args, ctx)
        rel = parse_math(text)
        if not (isinstance(rel, sympy.Basic) and rel.is_Relational) or isinstance(rel, sympy.Equality):
            raise BadArguments(f"not an inequality: {text[:60]!r}")
        syms = sorted(rel.free_symbols, key=lambda s: s.name)
        if len(syms) != 1:
            raise BadArguments(f"an inequality needs exactly one unknown, got {len(syms)}")
        solved = sympy.solve_univariate_inequality(rel, syms[0], relational=False)
        return _format_set(solved, syms[0].name, _decimal_mode(text))


def _format_set(s, x: str, decimal: bool) -> str:
    """An interval set as WolframAlpha writes it: `x > 2`, `2 < x <= 5`, `... or ...`."""
    if isinstance(s, sympy.Union):
        return " or ".join(_format_set(a, x, decimal) for a in s.args)
    if s == sympy.S.Reals:
        return "all real x"
    if s is sympy.S.EmptySet:
        return "no solution"
    if isinstance(s, sympy.FiniteSet):
        return ", ".join(f"{x} = {format_value(v, decimal)}" for v in s)
    if isinstance(s, sympy.Interval):
        lo, hi = s.start, s.end
        if lo == -sympy.oo:
            return f"{x} {'<' if s.right_open else '<='} {format_value(hi, decimal)}"
        if hi == sympy.oo:
            return f"{x} {'>' if s.left_open else '>='} {format_value(lo, decimal)}"
        return (f"{format_value(lo, decimal)} {'<' if s.left_open else '<='} {x} "
                f"{'<' if s.right_open else '<='} {format_value(hi, decimal)}")
    return _pretty(str(s))


class Define(Tool):
    name = "Define"
    description = "Define a variable or a number for latter usage"

    def __call__(self, args: str, ctx: ToolContext) -> str:
        text = ctx.substitute(args).strip()
        if not text:
            raise BadArguments("Define needs a variable or a number")
        return text


class Count(Tool):
    name = "Count"
    description = "Count the number of elements in the given list"

    def __call__(self, args: str, ctx: ToolContext) -> str:
        text = ctx.substitute(args).strip().strip("[]{}()")
        items = [i.strip() for i in text.split(",") if i.strip()]
        if "..." in items:  # an arithmetic sequence a, b, ..., z
            if len(items) < 4 or items.index("...") != len(items) - 2:
                raise BadArguments("a sequence with '...' needs 'a, b, ..., z'")
            a, b, z = (parse_math(items[0]), parse_math(items[1]), parse_math(items[-1]))
            n = sympy.simplify((z - a) / (b - a) + 1)
            return format_value(n)
        return str(len(items))


def maths_tools() -> list[Tool]:
    return [Calculator(), SetEquation(), SolveEquation(), SolveInequality(), Define(), Count()]
