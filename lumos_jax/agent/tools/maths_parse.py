"""Maths text -> sympy objects by our own tokenizer and recursive-descent parser.

Model text and tool output are untrusted, so nothing here hands a string to sympy's parser
(which calls `eval`): every node is built by calling sympy constructors directly. The
grammar (lowest precedence first):

    system   := relation ((',' | ';' | 'and') relation)*
    relation := expr [('=' | '==' | '!=' | '<' | '<=' | '>' | '>=') expr]
    expr     := term (('+' | '-') term)*
    term     := unary (('*' | '/' | '%' | 'mod') unary | <implicit> power)*
    unary    := ('-' | '+') unary | power
    power    := postfix [('^' | '**') unary]          (right-associative)
    postfix  := atom ('!' | '%' | 'percent')*
    atom     := number | name | function '(' system ')' | '(' expr ')'

Implicit multiplication reads as WolframAlpha does: `2x`, `2(x+1)`, `(a)(b)`, `x y`; a
multi-letter name such as `xy` is `x*y` when `split_names` is set (WolframAlpha, the
reference's annotations: `SolveEquation(R2=xy, R3=x/y)`) and otherwise only when every one
of its letters is also used as a one-letter name in the same text. `%` is a percentage
after an operand unless a number or `(` follows (`7 % 3` is the remainder), and `40% of x`
is `0.4x`. Decimals are exact rationals. Sizes are checked before sympy does the work:
exponents, factorials, digits, nesting, and (in `check_expansion`) the number of terms an
expansion would make.
"""

from __future__ import annotations

import math
import re

import sympy

from lumos_jax.agent.tools.base import BadArguments

MAX_TEXT = 20_000  # characters of a formula after substitution
MAX_LITERAL_DIGITS = 400  # digits of one number literal
MAX_EXPONENT = 10_000  # |n| in x^n
MAX_RESULT_DIGITS = 20_000  # digits of an exact numeric power
MAX_FACTORIAL = 2_000
MAX_BINOMIAL = 10_000
MAX_DEPTH = 60  # nesting of parentheses, unary signs and powers
MAX_TERMS = 5_000  # terms an expansion may have

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)
  | (?P<name>[A-Za-z][A-Za-z0-9_]*)
  | (?P<op>\*\*|==|!=|<=|>=|[-+*/^%!()\[\],;=<>])
)""", re.X)
_SPACE = re.compile(r"\s*")
_UNICODE = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "≤": "<=", "≥": ">=", "≠": "!=",
                          "$": " "})
_CLOSE = {"(": ")", "[": "]"}
_RELATIONS = {"=", "==", "!=", "<", "<=", ">", ">="}
_KEYWORDS = {"and", "of", "mod", "percent"}


def _round(x, n=sympy.Integer(0)):
    """Round half to even at `n` decimals (as WolframAlpha's Round), exactly."""
    if not (x.is_number and x.is_real and n.is_Integer) or abs(int(n)) > 100:
        raise BadArguments("round needs a real number and at most 100 decimals")
    scale = sympy.Integer(10) ** int(n)
    scaled = x * scale
    low = sympy.floor(scaled)
    frac = scaled - low
    up = frac > sympy.Rational(1, 2) or (frac == sympy.Rational(1, 2) and low % 2 == 1)
    return (low + 1 if up else low) / scale


def _factorial(n):
    if n.is_number and (not n.is_real or abs(n) > MAX_FACTORIAL):
        raise BadArguments(f"factorial argument too large (limit {MAX_FACTORIAL})")
    return sympy.factorial(n)


def _binomial(n, k):
    if any(a.is_number and (not a.is_real or abs(a) > MAX_BINOMIAL) for a in (n, k)):
        raise BadArguments(f"binomial arguments too large (limit {MAX_BINOMIAL})")
    return sympy.binomial(n, k)


def _log(x, base=None):
    return sympy.log(x) if base is None else sympy.log(x, base)


# name -> (callable, allowed argument counts)
FUNCTIONS = {
    "sqrt": (sympy.sqrt, (1,)), "abs": (sympy.Abs, (1,)), "Abs": (sympy.Abs, (1,)),
    "floor": (sympy.floor, (1,)), "ceil": (sympy.ceiling, (1,)), "ceiling": (sympy.ceiling, (1,)),
    "round": (_round, (1, 2)), "min": (sympy.Min, tuple(range(1, 33))), "max": (sympy.Max, tuple(range(1, 33))),
    "log": (_log, (1, 2)), "ln": (sympy.log, (1,)), "exp": (sympy.exp, (1,)),
    "sin": (sympy.sin, (1,)), "cos": (sympy.cos, (1,)), "tan": (sympy.tan, (1,)),
    "factorial": (_factorial, (1,)), "gcd": (sympy.gcd, (2,)), "lcm": (sympy.lcm, (2,)),
    "binomial": (_binomial, (2,)), "Mod": (sympy.Mod, (2,)), "mod": (sympy.Mod, (2,)),
}
CONSTANTS = {"pi": sympy.pi, "e": sympy.E, "True": sympy.true, "False": sympy.false}


def clean(text: str) -> str:
    """Unicode operators to ASCII, `$` dropped, a trailing period removed."""
    return text.translate(_UNICODE).strip().rstrip(".").strip()


def tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) tokens; kind is 'num', 'name' or 'op'. Linear time."""
    s = clean(text)
    if len(s) > MAX_TEXT:
        raise BadArguments(f"formula longer than {MAX_TEXT} characters")
    out, pos = [], 0
    while True:
        pos = _SPACE.match(s, pos).end()
        if pos >= len(s):
            return out
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise BadArguments(f"unexpected character {s[pos]!r} at position {pos} of {s[:60]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()


def _number(text: str):
    digits = sum(c.isdigit() for c in text)
    if digits > MAX_LITERAL_DIGITS:
        raise BadArguments(f"a number with {digits} digits (limit {MAX_LITERAL_DIGITS})")
    return sympy.Rational(text.replace(",", ""))


def _digits(q) -> float:
    """Decimal digits of the larger of a rational's numerator and denominator."""
    return max(abs(int(q.p)), abs(int(q.q)), 1).bit_length() * 0.30103


def power(base, exp):
    """`base ** exp`, refused when the exact result would be too large to compute."""
    if exp.is_number and exp.is_Rational:
        big_base = base.is_number and base not in (sympy.Integer(0), sympy.Integer(1), sympy.Integer(-1))
        if abs(exp) > MAX_EXPONENT and (big_base or not base.is_number):
            raise BadArguments(f"exponent {_short(exp)} too large (limit {MAX_EXPONENT})")
        if base.is_Rational and float(abs(exp)) * _digits(base) > MAX_RESULT_DIGITS:
            raise BadArguments(f"power with more than {MAX_RESULT_DIGITS} digits")
    elif exp.is_number and exp.is_real is not False and base.is_number:
        try:
            if abs(float(exp)) > MAX_EXPONENT:
                raise BadArguments(f"exponent too large (limit {MAX_EXPONENT})")
        except TypeError:
            pass
    return sympy.Pow(base, exp)


def _short(x) -> str:
    s = str(x)
    return s if len(s) <= 20 else s[:20] + "..."


def expansion_terms(e) -> int:
    """An upper bound on the number of terms `expand(e)` makes (without expanding)."""
    if isinstance(e, sympy.Add):
        return sum(expansion_terms(a) for a in e.args)
    if isinstance(e, sympy.Mul):
        n = 1
        for a in e.args:
            n *= expansion_terms(a)
            if n > MAX_TERMS * 10:
                break
        return n
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 1:
        k = expansion_terms(e.base)
        if k == 1:
            return 1
        n = int(e.exp)
        return math.comb(n + k - 1, k - 1) if n < 10**6 and k < 10**4 else MAX_TERMS * 10
    if isinstance(e, sympy.Basic) and e.args:  # equations, comparisons, functions: their parts
        return max(1, sum(expansion_terms(a) for a in e.args))
    return 1


def check_expansion(e) -> None:
    if isinstance(e, sympy.Basic) and expansion_terms(e) > MAX_TERMS:
        raise BadArguments(f"the expression would expand to more than {MAX_TERMS} terms")


class _Parser:
    def __init__(self, text: str, split_names: bool):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0
        singles = {t for k, t, _ in self.toks if k == "name" and len(t) == 1}
        self.split_names, self.singles = split_names, singles

    # -- helpers
    def peek(self, k: int = 0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else (None, None, len(self.text))

    def is_op(self, op: str, k: int = 0) -> bool:
        kind, t, _ = self.peek(k)
        return kind == "op" and t == op

    def is_name(self, name: str, k: int = 0) -> bool:
        kind, t, _ = self.peek(k)
        return kind == "name" and t == name

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def fail(self, what: str):
        _, t, pos = self.peek()
        where = f"at {t!r} (position {pos})" if t is not None else "at the end"
        raise BadArguments(f"cannot read formula {self.text[:60]!r}: {what} {where}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise BadArguments(f"formula nested deeper than {MAX_DEPTH} levels")

    def starts_operand(self, k: int = 0) -> bool:
        kind, t, _ = self.peek(k)
        return kind == "num" or (kind == "name" and t not in _KEYWORDS) or (kind == "op" and t in _CLOSE)

    # -- grammar
    def system(self) -> list:
        items = [self.relation()]
        while self.is_op(",") or self.is_op(";") or self.is_name("and"):
            self.take()
            items.append(self.relation())
        if self.peek()[0] is not None:
            self.fail("unexpected")
        return items

    def relation(self):
        left = self.expr()
        kind, t, _ = self.peek()
        if kind == "op" and t in _RELATIONS:
            self.take()
            right = self.expr()
            if self.peek()[0] == "op" and self.peek()[1] in _RELATIONS:
                self.fail("more than one relation")
            return _relation(t, left, right)
        return left

    def expr(self):
        """Terms are collected and added once (repeated `a + b` would be quadratic)."""
        terms = [self.term()]
        while self.is_op("+") or self.is_op("-"):
            op = self.take()[1]
            rhs = _value(self.term())
            terms.append(rhs if op == "+" else -rhs)
        return terms[0] if len(terms) == 1 else sympy.Add(*[_value(t) for t in terms])

    def term(self):
        factors = [self.unary()]
        while True:
            if self.is_op("*") or self.is_op("/"):
                op = self.take()[1]
                rhs = _value(self.unary())
                factors.append(rhs if op == "*" else sympy.Pow(rhs, -1))
            elif self.is_op("%") or self.is_name("mod"):
                self.take()
                factors = [sympy.Mod(_product(factors), _value(self.unary()))]
            elif self.starts_operand() and self.peek()[0] != "num":
                factors.append(_value(self.power()))
            elif self.starts_operand():
                self.fail("two numbers in a row")
            else:
                return _product(factors)

    def unary(self):
        if self.is_op("-") or self.is_op("+"):
            op = self.take()[1]
            self.enter()
            v = self.unary()
            self.depth -= 1
            return -v if op == "-" else v
        return self.power()

    def power(self):
        base = self.postfix()
        if self.is_op("^") or self.is_op("**"):
            self.take()
            self.enter()
            exp = self.unary()
            self.depth -= 1
            return power(_value(base), _value(exp))
        return base

    def postfix(self):
        prev_kind = self.peek()[0]
        value = self.atom()
        while True:
            if self.is_op("!"):
                self.take()
                value = _factorial(_value(value))
            elif self.is_name("percent") or (self.is_op("%") and self._percent_here(prev_kind)):
                self.take()
                value = _value(value) / 100
                if self.is_name("of"):
                    self.take()
                    value = value * _value(self.power())
            else:
                return value

    def _percent_here(self, prev_kind) -> bool:
        """`%` is a percentage unless an operand follows (`7 % 3`); `40% of x`, `40% x`."""
        if self.is_name("of", 1) or not self.starts_operand(1):
            return True
        return prev_kind == "num" and self.peek(1)[0] == "name"

    def atom(self):
        kind, t, _ = self.peek()
        if kind == "num":
            self.take()
            return _number(t)
        if kind == "op" and t in _CLOSE:
            self.take()
            self.enter()
            inner = self.expr()
            self.depth -= 1
            if not self.is_op(_CLOSE[t]):
                self.fail(f"expected {_CLOSE[t]!r}")
            self.take()
            return inner
        if kind == "name" and t not in _KEYWORDS:
            self.take()
            return self.name(t)
        self.fail("expected a number, a name or '('")

    def name(self, t: str):
        if t in FUNCTIONS:
            if not (self.is_op("(") or self.is_op("[")):
                self.fail(f"{t} needs parentheses")
            return self.call(t)
        if t in CONSTANTS:
            return CONSTANTS[t]
        if len(t) > 1 and t.isalpha() and (self.split_names or set(t) <= self.singles):
            return sympy.Mul(*[sympy.Symbol(c) for c in t])
        return sympy.Symbol(t)

    def call(self, fname: str):
        fn, arities = FUNCTIONS[fname]
        open_ = self.take()[1]
        self.enter()
        args = [self.expr()]
        while self.is_op(","):
            self.take()
            args.append(self.expr())
        self.depth -= 1
        if not self.is_op(_CLOSE[open_]):
            self.fail(f"expected {_CLOSE[open_]!r}")
        self.take()
        if len(args) not in arities:
            raise BadArguments(f"{fname} takes {' or '.join(map(str, arities[:2]))} argument(s), got {len(args)}")
        try:
            return fn(*[_value(a) for a in args])
        except (TypeError, ValueError) as e:
            raise BadArguments(f"{fname}: {e}") from None


def _product(factors: list):
    return factors[0] if len(factors) == 1 else sympy.Mul(*[_value(f) for f in factors])


def _value(v):
    if v in (sympy.true, sympy.false) or (isinstance(v, sympy.Basic) and v.is_Relational):
        raise BadArguments("a comparison cannot be used as a number")
    return v


def _relation(op: str, a, b):
    a, b = _value(a), _value(b)
    if op == "=":
        return sympy.Eq(a, b, evaluate=False)
    cls = {"==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}[op]
    try:
        return cls(a, b)
    except TypeError as e:  # e.g. a complex number in an ordering
        raise BadArguments(f"cannot compare: {e}") from None


def parse_system(text: str, split_names: bool = False) -> list:
    """Every equation/expression of a `,`/`;`/`and`-separated list."""
    if not text.strip():
        raise BadArguments("empty formula")
    try:
        items = _Parser(text, split_names).system()
    except ZeroDivisionError:
        raise BadArguments(f"division by zero in {text[:60]!r}") from None
    except RecursionError:
        raise BadArguments(f"formula nested too deeply: {text[:60]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # sympy refusing an operation (e.g. True + 1)
        raise BadArguments(f"cannot compute {text[:60]!r}: {type(e).__name__}") from None
    for item in items:
        check_expansion(item)
    return items


def parse_math(text: str, split_names: bool = False):
    """One formula, equation (`a = b`, unevaluated) or comparison."""
    items = parse_system(text, split_names)
    if len(items) != 1:
        raise BadArguments(f"expected one formula, got {len(items)} in {text[:60]!r}")
    return items[0]
