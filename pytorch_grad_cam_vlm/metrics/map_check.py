"""What a deletion check says of its map: :class:`MapCheck` (the measured values of
:func:`~pytorch_grad_cam_vlm.metrics.deletion_check.check_maps`) and its verdict, and :func:`failure_warning`'s line
for a map not to trust.

The verdict is ``"ok"`` only where the map beats maps of no information on the same image (its ``null_margin`` reaches
:data:`~pytorch_grad_cam_vlm.metrics.null.CHANCE_MARGIN`; ``"chance"`` below it). Where the check cannot tell maps
apart on an image, the verdict says ``"untestable"`` instead of judging the map (:attr:`MapCheck.untestable`): the
target hardly depends on the image, no removal moved the target, or any removal breaks it (the map's least relevant
share, its most relevant and random token cells' alike). Where removing the map's least relevant share breaks the
target as removing its most relevant does but random cells of the same share do not, the map is ``"incomplete"``:
its least relevant pixels hold evidence too. A map drawn at random whose second draw differs is
``"unstable"``; a check not made in full (``explain``'s staged choice measures most candidates at its first fraction
only) judges nothing and says ``"partial"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from pytorch_grad_cam_vlm.metrics.null import CHANCE_MARGIN, NULL_SPREAD_FLOOR

# Removing a share "breaks" the target where it costs FRAGILE_SHARE of max(1, |clean|). Where the map's least relevant
# share at the first fraction breaks it as its most relevant share does, the top-minus-bottom score's sign is noise:
# the map is "incomplete" where the null maps' random shares (their median) do not break it, "untestable" where they
# do too, or where no null was measured. A check that cannot tell maps apart also says "untestable" where no removal
# it made moved the target by NULL_SPREAD_FLOOR of max(1, |clean|) (the demo model's answers to a grey image). On the
# pairs model every such map (12.5 % of the default's) had its least relevant 5 % on the second of the two asked
# objects (the first ten looked at), and random 5 % of token cells (the median of the null's twelve removals) moved
# the answer by at most 0.01 logits on 23 of 25, by 0.55 and 3.4 on two, where the map's bottom drops it from 7.5 to
# below -0.8: docs/auto.md, benchmarks/verdict_null.md.
FRAGILE_SHARE = 0.5
# A map drawn at random (RandomCAM's channel weights, a Smooth method's noise) must come out nearly the same when its
# method runs again: below this correlation (Pearson) of the two draws its verdict is "unstable". RandomCAM's maps
# follow the objects often enough to pass the deletion check (benchmarks/verdict_null.md). Chosen on the five
# development models (benchmarks/verdict_stability.md, 200 held-out samples each): the lowest floor of 0.5-0.9 at
# which RandomCAM's single-layer maps are flagged (this or the check's verdict) >= 0.9 on every model, with room:
# 0.921-0.959 at 0.7 (0.885 at 0.5), while SmoothGradCAMPlusPlus's (n_samples 50, 40 samples) are unstable 0.013-0.106
# per layer (0.025-0.150 of its chosen maps; at 0.9: 0.013-0.175 and 0.025-0.250).
STABILITY_FLOOR = 0.7


@dataclass
class MapCheck:
    """The deletion check of one map: ``score`` (NaN when blank), the target with the top / bottom fractions
    removed (one value per fraction), the drop of the target when the window around the map's peak is removed (NaN
    when blank), and the verdicts."""

    score: float
    top_removed: List[float]
    bottom_removed: List[float]
    blank: bool
    peak_drop: float
    estimated: bool = False  # the first-order estimate (deletion_check.first_order_checks), not measured
    partial: bool = False  # measured at the first fraction only (``explain``'s first stage): not the check's score
    null_margin: Optional[float] = None  # (total - the null's mean) / the null's spread; None: no null measured
    clean: Optional[float] = None  # the target on the whole image; None: not recorded (no "untestable" verdict)
    stability: Optional[float] = None  # correlation with a second draw of its method; None: not redrawn
    prompt_only: bool = False  # the target hardly depends on the image (explain's visual reliance): untestable
    null_removal_drop: Optional[float] = None  # the median drop when a null map's first share is removed; None: no null
    null_totals: Optional[Tuple[float, ...]] = None  # the null maps' totals on the same image; None: no null

    @property
    def total(self) -> float:
        """``score + peak_drop``: how a map ranks among the maps of its image (NaN when blank)."""
        return self.score + self.peak_drop

    @property
    def untestable(self) -> bool:
        """The check cannot tell this map from another on this image: the target hardly depends on the image
        (:attr:`prompt_only`), no removal it made moved the target (:attr:`unmoved`), or removing the map's least
        relevant share breaks it as removing its most relevant share does (:attr:`both_shares_break`) and so does
        removing random token cells (:attr:`null_removal_drop`; or no null was measured to tell)."""
        if self.blank or not self.complete:
            return False
        if self.prompt_only or self.unmoved:
            return True
        return self.both_shares_break and (self.null_removal_drop is None
                                           or self.null_removal_drop >= FRAGILE_SHARE * self.scale)

    @property
    def incomplete(self) -> bool:
        """Removing the map's least relevant share breaks the target as removing its most relevant share does, while
        removing random token cells of the same share does not: its least relevant pixels hold evidence too."""
        return self.complete and not self.blank and not self.untestable and self.both_shares_break

    @property
    def both_shares_break(self) -> bool:
        """Removing the map's most relevant share and, apart, its least relevant share (first fraction) each cost the
        target :data:`FRAGILE_SHARE` of :attr:`scale` (False when the clean value was not recorded)."""
        return (self.clean is not None and not self.blank and min(
            self.clean - self.top_removed[0], self.clean - self.bottom_removed[0]) >= FRAGILE_SHARE * self.scale)

    @property
    def scale(self) -> float:
        """``max(1, |clean|)``: what the untestable verdict's thresholds are shares of (NaN when not recorded)."""
        return float("nan") if self.clean is None else max(1.0, abs(self.clean))

    @property
    def unmoved(self) -> bool:
        """No removal of the check moved the target by
        :data:`~pytorch_grad_cam_vlm.metrics.null.NULL_SPREAD_FLOOR` of :attr:`scale` (False when the clean value
        was not recorded)."""
        return (self.clean is not None and not self.blank
                and bool(self.largest_change() < NULL_SPREAD_FLOOR * self.scale))

    def largest_change(self, clean: Optional[float] = None) -> float:
        """The largest change of the target from ``clean`` (default: the recorded clean value) among this check's
        removals: the map's top and bottom shares and its peak window (NaN when blank)."""
        clean = self.clean if clean is None else clean
        if self.blank:
            return float("nan")
        return float(max([abs(clean - v) for v in self.top_removed + self.bottom_removed] + [abs(self.peak_drop)]))

    @property
    def unstable(self) -> bool:
        """A second draw of the map's method gave another map: :attr:`stability` below :data:`STABILITY_FLOOR` (or
        NaN: one of the two draws is flat)."""
        return not self.blank and self.stability is not None and not self.stability >= STABILITY_FLOOR

    @property
    def complete(self) -> bool:
        """Measured in full: neither ``partial`` nor ``estimated``. Only a complete check judges its map."""
        return not (self.partial or self.estimated)

    @property
    def inverted(self) -> bool:
        """Removing the map's top hurts the target less than removing its bottom (on a complete check that can
        tell)."""
        return not self.blank and self.complete and not self.untestable and not self.incomplete and self.score < 0

    @property
    def beats_chance(self) -> Optional[bool]:
        """``null_margin`` reaches :data:`~pytorch_grad_cam_vlm.metrics.null.CHANCE_MARGIN` (``None`` when no null
        was measured or the check is not :attr:`complete`)."""
        return None if self.null_margin is None or not self.complete else bool(self.null_margin >= CHANCE_MARGIN)

    @property
    def failed(self) -> bool:
        """Blank, unstable, untestable, incomplete, inverted, or no better than maps of no information: a map not to
        trust."""
        return (self.blank or self.unstable or self.untestable or self.incomplete or self.inverted
                or self.beats_chance is False)

    @property
    def verdict(self) -> str:
        """``"blank"``, ``"unstable"`` (another draw of its method differs), ``"partial"`` (the check was not made
        in full: it judges nothing), ``"untestable"`` (the check cannot tell maps apart on this image),
        ``"incomplete"`` (its least relevant pixels hold evidence too), ``"inverted"``, ``"chance"`` (does not beat
        the null) or ``"ok"``."""
        return ("blank" if self.blank else "unstable" if self.unstable else "partial" if not self.complete
                else "untestable" if self.untestable else "incomplete" if self.incomplete
                else "inverted" if self.inverted else "chance" if self.failed else "ok")


def failure_warning(name: str, label: str, check: MapCheck, best: Optional[str] = None) -> Optional[str]:
    """One line for a map that fails the check (``None`` when it passes): what failed, by how much, and the
    best-scoring alternative of the same call when there is one."""
    if not check.failed:
        return None
    if check.blank:
        what = f"{name}: {label} is blank (the map is flat: it shows nothing)"
    elif check.unstable:
        what = (f"{name}: {label} is unstable (a second run of its method gave a map of correlation "
                f"{check.stability:.2f} with it, below {STABILITY_FLOOR:g}: the map is a random draw, not an "
                "explanation; a Smooth method needs a larger n_samples)")
    elif check.untestable:
        what = (f"{name}: {label} cannot be checked on this image (" + (
            "the target hardly depends on the image: see its visual reliance" if check.prompt_only else
            f"no removal the check made moved the target by {NULL_SPREAD_FLOOR * check.scale:.2g}" if check.unmoved else
            f"{both_drops(check)}, " + (
                "and no null was measured to tell whether any removal does" if check.null_removal_drop is None else
                f"as random token cells do by {check.null_removal_drop:.3g}: the answer breaks under any removal"))
            + ")")
    elif check.incomplete:
        what = (f"{name}: {label} is incomplete ({both_drops(check)}, where random token cells drop it by "
                f"{check.null_removal_drop:.2g}: its least relevant pixels hold evidence too; occlusion_map with "
                "windows of the token cell removes each part in turn and finds it)")
    elif not check.inverted:
        what = (f"{name}: {label} does not beat chance (its check total is {check.null_margin:.2g} spreads above the "
                f"mean of random token maps' on this image, below {CHANCE_MARGIN:g})")
    else:
        what = (f"{name}: {label} is inverted (deletion check {check.score:+.3g}: removing its most relevant pixels "
                "hurts the target less than removing its least relevant)")
    return what + (f"; {best} ranks best on the check" if best else "") + "."


def both_drops(check: MapCheck) -> str:
    """The warning's words for :attr:`MapCheck.both_shares_break`: what removing each share cost the target."""
    return (f"removing even its least relevant pixels drops the target by {check.clean - check.bottom_removed[0]:.3g}, "
            f"as its most relevant do by {check.clean - check.top_removed[0]:.3g}")
