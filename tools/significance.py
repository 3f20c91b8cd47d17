#!/usr/bin/env python3
"""Is a set of runs significantly better than a baseline? One-sided Welch t-test, in nats and in bpb.

    python3 tools/significance.py --new logs/mine_seed*.txt --baseline logs/base_seed*.txt
    python3 tools/significance.py --new logs/mine_seed*.txt --baseline-stats 1.07578747,0.00070,3 --unit bpb
    python3 tools/significance.py --new-stats 2.7712,0.0011,3 --baseline-stats 2.7789,0.0018,3 --unit nats

A run's score is its final pass (the line behind `final val_bpb`): val_loss in nats per token and
val_bpb. The challenge bar for a new record is "at least 0.005 nats better at p < 0.01". Read here as
a test of the margin itself: with gain = mean(baseline) - mean(new) in nats per token,

    H0: gain <= 0.005 nats    against    H1: gain > 0.005 nats     (one-sided Welch t-test)

and the bar is met when H0 is rejected at p < 0.01. This is stricter than "gain > 0.005 observed and
gain > 0 at p < 0.01": a 0.0051 gain over 3 noisy seeds does not meet it. The p-value of plain
improvement (H0: gain <= 0) is printed as well; the maintainers' leaderboard rows quote that one
(against the previous row, at p < 0.25). So is the gain the bar would need with the same spreads and seed
counts (margin + t_{1-alpha, df} x standard error): when the observed gain falls short of it, more seeds
shrink the standard error and the needed gain with it.

bpb and nats differ by one constant factor on a fixed validation set: val_loss / val_bpb = ln 2 x
(bytes / tokens), the same for every run. It is read from the logs (each log's final val_loss /
val_bpb; they must agree), or given with --nats-per-bpb when every side comes as statistics. The
margin in bpb is 0.005 / that factor, so the t statistic and p-value are the same in both units.

When both sides are logs of the same seeds, the runs are also paired by seed and a one-sided paired t-test
of the per-seed gains is printed after the bar. It is not the challenge's test (a record's runs are compared
with another submission's, not seed by seed), but where a seed moves both sides alike (the same data order
and, mostly, the same initialisation) it removes that shared part of the spread: a study can read it as
the tighter measurement of one change.

The t distribution's CDF is computed here (regularized incomplete beta by its continued fraction), so
the tool needs only the standard library; tests check it against scipy.stats.ttest_ind.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402

MARGIN_NATS = 0.005  # the challenge's bar for a new record
ALPHA = 0.01


# --- the t distribution -------------------------------------------------------------------------------


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b). The continued fraction converges fast for
    x < (a + 1) / (a + b + 2); above that, I_x(a, b) = 1 - I_(1-x)(b, a) brings x back into that range."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction 1 / (1 + d1 / (1 + d2 / (1 + ...))) of the incomplete beta, evaluated
    front to back with the modified Lentz method; d(2m) and d(2m+1) are its even and odd coefficients."""
    tiny = 1e-300

    def guard(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 1000):
        for coeff in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),              # d(2m)
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # d(2m+1)
            d = 1.0 / guard(1.0 + coeff * d)
            c = guard(1.0 + coeff / c)
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df need not be an integer)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t > 0 else 1.0 - tail


def t_isf(p: float, df: float) -> float:
    """The t with P(T > t) = p, for 0 < p < 1 (the inverse of t_sf), by bisection: t_sf falls as t grows."""
    lo, hi = -1.0, 1.0
    while t_sf(lo, df) < p:
        lo *= 2.0
    while t_sf(hi, df) > p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


# --- samples and the test -------------------------------------------------------------------------------


@dataclass
class Sample:
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator)
    n: int

    @classmethod
    def of(cls, values) -> "Sample":
        values = list(values)
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
        return cls(mean, std, n)

    def scaled(self, factor: float) -> "Sample":
        return Sample(self.mean * factor, self.std * factor, self.n)


@dataclass
class TTest:  # the outcome of a one-sided t-test, Welch's or paired
    gain: float    # mean(baseline) - mean(new): positive when the new runs score lower (better)
    margin: float  # H0: gain <= margin
    t: float
    df: float
    p: float
    se: float = 0.0  # standard error of the gain

    def gain_needed(self, alpha: float) -> float:
        """The smallest observed gain that would reject H0 at alpha with these spreads and seed counts."""
        if self.se == 0.0:
            return self.margin
        return self.margin + t_isf(alpha, self.df) * self.se


def t_test(gain: float, margin: float, se: float, df: float) -> TTest:
    """The one-sided t-test of H0: gain <= margin for a gain with standard error se and df degrees of freedom;
    se = 0 (identical runs) makes the gain exact: p is 0 or 1."""
    if se == 0.0:
        return TTest(gain, margin, math.copysign(math.inf, gain - margin), df, 0.0 if gain > margin else 1.0)
    t = (gain - margin) / se
    return TTest(gain, margin, t, df, t_sf(t, df), se)


def welch_one_sided(baseline: Sample, new: Sample, margin: float = 0.0) -> TTest:
    """One-sided Welch t-test of H0: mean(baseline) - mean(new) <= margin. Equals
    scipy.stats.ttest_ind(baseline, new + margin, equal_var=False, alternative="greater")."""
    if baseline.n < 2 or new.n < 2:
        raise ValueError(f"the Welch test needs at least 2 runs on each side (baseline {baseline.n}, new {new.n})")
    vb, vn = baseline.std ** 2 / baseline.n, new.std ** 2 / new.n
    se = math.sqrt(vb + vn)
    # Welch-Satterthwaite degrees of freedom; undefined (nan) when both sides have no spread
    df = math.nan if se == 0.0 else (vb + vn) ** 2 / (vb ** 2 / (baseline.n - 1) + vn ** 2 / (new.n - 1))
    return t_test(baseline.mean - new.mean, margin, se, df)


def paired_one_sided(gains, margin: float = 0.0) -> TTest:
    """One-sided paired t-test of H0: mean(gain) <= margin over per-seed gains (baseline - new of one seed).
    Equals scipy.stats.ttest_rel(baseline, new + margin, alternative="greater"); df = pairs - 1."""
    g = Sample.of(gains)
    if g.n < 2:
        raise ValueError(f"the paired test needs at least 2 seeds on both sides ({g.n} given)")
    return t_test(g.mean, margin, g.std / math.sqrt(g.n), g.n - 1)


def paired_by_seed(base_logs, new_logs):
    """{seed: (baseline nats, new nats)} when both sides hold one run of each of the same seeds (two or more),
    else None."""
    def by_seed(logs):
        seeds = [log.seed for log in logs]
        if None in seeds or len(set(seeds)) != len(seeds):
            return None
        return {log.seed: log.final_val_loss for log in logs}
    base, new = by_seed(base_logs), by_seed(new_logs)
    if not base or not new or set(base) != set(new) or len(base) < 2:
        return None
    return {seed: (base[seed], new[seed]) for seed in sorted(base)}


def paired_report(pairs: dict, nats_per_bpb: float | None, margin: float, alpha: float) -> str:
    gains = [b - n for b, n in pairs.values()]
    bar, any_gain = paired_one_sided(gains, margin), paired_one_sided(gains, 0.0)
    std, r = Sample.of(gains).std, nats_per_bpb
    per_seed = ", ".join(f"{seed}: {g:+.5f}" for seed, g in zip(pairs, gains))
    return "\n".join([
        f"paired by seed ({len(gains)} seeds; not the challenge's test): gains in nats {per_seed}; "
        f"std {std:.5f}" + ("" if r is None else f" ({std / r:.5f} bpb)"),
        f"  paired H0 gain <= 0:      t={any_gain.t:.3f} df={any_gain.df:g} p={any_gain.p:.4g}",
        f"  paired H0 gain <= {margin:g} nats: t={bar.t:.3f} df={bar.df:g} p={bar.p:.4g} "
        f"({'below' if bar.p < alpha else 'not below'} {alpha:g})"])


def seeds_needed(baseline: Sample, new: Sample, margin: float, alpha: float, cap: int = 1000) -> int | None:
    """The fewest runs a side (the same on both) with which the observed gain would pass the bar, if the means
    and spreads stayed as they are: a planning figure, not a promise (a spread from two or three seeds is
    itself uncertain). None when the observed gain is not above the margin or more than `cap` runs are needed."""
    if baseline.mean - new.mean <= margin:
        return None
    for n in range(2, cap + 1):
        if welch_one_sided(Sample(baseline.mean, baseline.std, n), Sample(new.mean, new.std, n), margin).p < alpha:
            return n
    return None


def ratio_from_logs(logs) -> float:
    """Nats per bpb (val_loss / val_bpb of the final pass), the same for every log of one validation set."""
    ratios = []
    for log in logs:
        final = log.final
        if final is None or final.val_loss is None or not final.val_bpb:
            raise ValueError(f"{log.path}: no final pass with val_loss and val_bpb (is the run complete?)")
        ratios.append(final.val_loss / final.val_bpb)
    if max(ratios) - min(ratios) > 1e-6 * max(ratios):
        raise ValueError(f"the logs' val_loss/val_bpb ratios differ ({min(ratios):.8f} to {max(ratios):.8f}): they scored "
                         f"different validation data or tokenizers, so their losses do not compare")
    return sum(ratios) / len(ratios)


@dataclass
class Comparison:
    baseline_nats: Sample
    new_nats: Sample
    nats_per_bpb: float | None
    bar: TTest          # H0: gain <= MARGIN_NATS
    improvement: TTest  # H0: gain <= 0
    alpha: float

    @property
    def bar_met(self) -> bool:
        return self.bar.p < self.alpha

    def report(self) -> str:
        r = self.nats_per_bpb

        def both(nats, fmt="{:.5f}"):
            return fmt.format(nats) + " nats" + ("" if r is None else " (" + fmt.format(nats / r) + " bpb)")

        lines = []
        for name, s in (("baseline", self.baseline_nats), ("new", self.new_nats)):
            lines.append(f"{name:<9} n={s.n}  mean {both(s.mean, '{:.6f}')}  std {both(s.std, '{:.6f}')}")
        if r is not None:
            lines.append(f"nats per bpb: {r:.6f} (val_loss / val_bpb of the logs)")
        b, i = self.bar, self.improvement
        lines += [f"observed gain (baseline - new): {both(b.gain)}",
                  f"H0 gain <= 0:      t={i.t:.3f} df={i.df:.2f} p={i.p:.4g}   (better at all)",
                  f"H0 gain <= {self.bar.margin:g} nats: t={b.t:.3f} df={b.df:.2f} p={b.p:.4g}",
                  f"challenge bar (gain > {self.bar.margin:g} nats at p < {self.alpha:g}): {'MET' if self.bar_met else 'NOT MET'}",
                  f"gain the bar needs with these spreads and seed counts: {both(b.gain_needed(self.alpha))}"]
        n = seeds_needed(self.baseline_nats, self.new_nats, self.bar.margin, self.alpha)
        if n is not None:
            runs = str(n)
        elif b.gain <= self.bar.margin:
            runs = "none suffice (the gain is not above the margin)"
        else:
            runs = "more than 1000"
        lines.append(f"runs a side the observed gain would need at these spreads: {runs}")
        return "\n".join(lines)


def compare(baseline_nats: Sample, new_nats: Sample, nats_per_bpb: float | None = None,
            margin: float = MARGIN_NATS, alpha: float = ALPHA) -> Comparison:
    return Comparison(baseline_nats, new_nats, nats_per_bpb, welch_one_sided(baseline_nats, new_nats, margin),
                      welch_one_sided(baseline_nats, new_nats, 0.0), alpha)


def parse_stats(text: str, option: str) -> Sample:
    try:
        mean, std, n = text.split(",")
        return Sample(float(mean), float(std), int(n))
    except ValueError:
        sys.exit(f"error: {option} {text!r} must be MEAN,STD,N (e.g. 1.07578747,0.00070,3)")


def load(paths, option: str) -> list:
    logs = []
    for p in paths:
        if not Path(p).is_file():
            sys.exit(f"error: {option} log {p} does not exist")
        log = runlog.read_log(p)
        if not log.complete:
            sys.exit(f"error: {option} log {p} is incomplete: {log.incomplete_reason}")
        logs.append(log)
    return logs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", nargs="+", default=[], help="logs of the runs under test")
    parser.add_argument("--baseline", nargs="+", default=[], help="logs of the baseline runs")
    parser.add_argument("--new-stats", help="the new runs as MEAN,STD,N instead of logs (in --unit)")
    parser.add_argument("--baseline-stats", help="the baseline as MEAN,STD,N instead of logs (in --unit)")
    parser.add_argument("--unit", choices=("bpb", "nats"), default="bpb", help="unit of the --*-stats figures")
    parser.add_argument("--nats-per-bpb", type=float, help="val_loss / val_bpb, needed when no side is given as logs")
    parser.add_argument("--margin", type=float, default=MARGIN_NATS, help="the bar's margin in nats (default 0.005)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level of the bar (default 0.01)")
    args = parser.parse_args(argv)
    if bool(args.new) == bool(args.new_stats) or bool(args.baseline) == bool(args.baseline_stats):
        parser.error("give each side once: --new logs or --new-stats, and --baseline logs or --baseline-stats")
    new_logs, base_logs = load(args.new, "--new"), load(args.baseline, "--baseline")
    ratio = args.nats_per_bpb
    if new_logs or base_logs:
        try:
            ratio = ratio_from_logs(new_logs + base_logs)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if args.nats_per_bpb and abs(args.nats_per_bpb - ratio) > 1e-4 * ratio:
            sys.exit(f"error: --nats-per-bpb {args.nats_per_bpb} disagrees with the logs' {ratio:.6f}: drop the option")
    if ratio is None and args.unit == "bpb":
        sys.exit("error: bpb statistics without logs need --nats-per-bpb (val_loss / val_bpb of a run on the same split)")

    def side(logs, stats, option):
        if logs:
            return Sample.of(log.final_val_loss for log in logs)
        s = parse_stats(stats, option)
        return s if args.unit == "nats" else s.scaled(ratio)

    base, new = side(base_logs, args.baseline_stats, "--baseline-stats"), side(new_logs, args.new_stats, "--new-stats")
    try:
        result = compare(base, new, ratio, args.margin, args.alpha)
    except ValueError as e:
        sys.exit(f"error: {e}: give more seeds, or the baseline as --baseline-stats MEAN,STD,N")
    print(result.report())
    pairs = paired_by_seed(base_logs, new_logs)
    if pairs is not None:
        print(paired_report(pairs, ratio, args.margin, args.alpha))


if __name__ == "__main__":
    main()
