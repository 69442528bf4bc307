"""Bad input in image folders: convert what can be converted, skip what cannot, say so.

Every image is opened and fully decoded once before training (measured on 2 busy cores: 200
original photos in 0.4 s, 2,934 photos at 192 px in 2.9 s). Truncated or corrupt files,
zero-byte files, non-images with image extensions and decompression bombs are skipped with
their names in the log; grayscale, CMYK, palette and alpha images are converted to RGB when
loaded. A class left without images stops the run before any work.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from flowerdist.data.folder import ImageFolderIndex, require_images_in_every_class
from flowerdist.data.images import check_image, shown


@dataclass
class CheckReport:
    root: Path
    total: int
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    converted: dict[str, str] = field(default_factory=dict)  # file -> original mode
    counts: dict[str, int] = field(default_factory=dict)  # usable images per class

    def lines(self, names_per_reason: int = 5) -> list[str]:
        """The report: totals, conversions, skipped files by reason (the first few names, then a count), per class."""
        out = [f"data {self.root}: {self.total} images, {self.total - len(self.skipped)} usable, {len(self.skipped)} skipped, {len(self.converted)} converted to RGB"]
        if self.converted:
            modes = Counter(self.converted.values())
            out.append("  converted: " + ", ".join(f"{n} {m}" for m, n in sorted(modes.items())))
        by_kind: dict[str, list[str]] = {}  # "truncated or corrupt (detail)" -> kind "truncated or corrupt"
        for name, reason in sorted(self.skipped.items()):
            by_kind.setdefault(reason.split(" (")[0], []).append(name)
        for kind, names in by_kind.items():
            out += [f"  skipped {shown(name)}: {self.skipped[name]}" for name in names[:names_per_reason]]
            if len(names) > names_per_reason:
                out.append(f"  skipped {len(names) - names_per_reason} more: {kind}")
        out.append("  per class: " + ", ".join(f"{c} {n}" for c, n in self.counts.items()))
        return out


def check_folder(index: ImageFolderIndex, threads: int = 4) -> CheckReport:
    """Decode every image once (threads: PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(check_image, (index.root / f for f in index.files)))
    report = CheckReport(index.root, len(index.files))
    usable = Counter()
    for name, label, (status, detail) in zip(index.files, index.labels, results):
        if status == "skip":
            report.skipped[name] = detail
            continue
        if status == "convert":
            report.converted[name] = detail
        usable[label] += 1
    report.counts = {c: usable.get(i, 0) for i, c in enumerate(index.classes)}
    return report


def usable_index(index: ImageFolderIndex, skipped: set[str] | dict[str, str]) -> ImageFolderIndex:
    """The index without skipped files; fails before training when a class ends up empty."""
    keep = [i for i, f in enumerate(index.files) if f not in skipped]
    filtered = replace(index, files=tuple(index.files[i] for i in keep), labels=tuple(index.labels[i] for i in keep))
    require_images_in_every_class(
        filtered, "has no readable image left after skipping bad files", f"run `flowerdist data check {index.root}` for the list"
    )
    return filtered
