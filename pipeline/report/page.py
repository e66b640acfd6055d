"""The report as one self-contained HTML page: the scores, and the images behind them."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import counted
from pipeline.extract.decode import MAX_BYTES_PER_PIXEL, MAX_PIXELS, TooManyPixels, load_rgb, read_image_file

THUMBNAIL_PX = 96
# A backslash ending a line below joins the next line to it: the wrapping leaves the style's text as it was.
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;\
color:#1b1f24;padding:0 16px}
h1{font-size:24px}h2{font-size:19px;margin-top:34px;border-bottom:1px solid #d0d7de;padding-bottom:4px}\
h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}\
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7}tr.best td{background:#eef6ee;font-weight:600}.untrained{color:#b42318;font-weight:700}
.warn{background:#fff4e5;border:1px solid #f0b35b;padding:8px 12px;border-radius:4px}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}figure.t{margin:0;width:104px;font-size:11px;color:#57606a;word-break:break-all}
figure.t img,.missing{width:96px;height:96px;object-fit:contain;background:#f3f5f7;display:block}
.missing{background:#c9ced4;color:#24292f;font-size:10px;overflow:hidden;padding:2px;box-sizing:border-box}
.cells{display:flex;flex-wrap:wrap;gap:4px 22px}.cell{margin:6px 0}.cell h3{margin:4px 0;font-size:13px}\
.plot{max-width:min(100%,720px)}.none{color:#57606a;font-style:italic}
"""


@dataclass
class Thumbnails:
    """Small JPEGs of the dataset's images, made through the project's own decoding (EXIF, CMYK, 16-bit), once
    per file; a file that moved or vanished since extraction gets a grey placeholder with its path."""

    root: Path
    limit: int  # at most this many distinct images are decoded for one page
    made: dict[str, str] = field(default_factory=dict)

    def __call__(self, path: str, caption: str | None = None) -> str:
        if path not in self.made:
            self.made[path] = self._make(path) if len(self.made) < self.limit else self._missing(path, "not shown")
        tag = self.made[path]
        text = path if caption is None else caption
        return f'<figure class="t">{tag}<figcaption>{html.escape(text)}</figcaption></figure>'

    def _make(self, path: str) -> str:
        try:
            data = read_image_file(self.root / path, MAX_PIXELS * MAX_BYTES_PER_PIXEL)
            image = load_rgb(data, min_short_side=2 * THUMBNAIL_PX)
        except (OSError, TooManyPixels, ValueError, Image.DecompressionBombError):
            return self._missing(path, "missing")
        except Exception:  # Pillow raises many types for damaged files; a thumbnail never stops the page
            return self._missing(path, "cannot be decoded")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=70)
        data64 = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f'<img alt="{html.escape(path)}" src="data:image/jpeg;base64,{data64}">'

    @staticmethod
    def _missing(path: str, why: str) -> str:
        return f'<div class="missing" title="{html.escape(path)}">{why}: {html.escape(path)}</div>'


def embedded_png(path: Path, alt: str) -> str:
    """A PNG of the output folder as an inline image (or a line saying it is absent)."""
    if not path.exists():
        return f'<p class="none">{html.escape(alt)}: not drawn.</p>'
    data64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data64}">'


def render_page(report: dict[str, Any], data: dict[str, np.ndarray], out: Path, rows: Sequence[Sequence[str]],
                thumbnails: int, every: bool) -> str:
    """The page's HTML.

    Parameters
    ----------
    report : dict
        ``report.json``.
    data : dict
        ``report-data.npz``: the split's ``paths``, ``labels``, ``part``; per result ``proba<i>``, the test
        part's probabilities; ``best``; the leaks, label issues and map fit found.
    out : Path
        The output folder (its PNG figures are embedded).
    rows : sequence of sequences of str
        The comparison table, header first (:func:`pipeline.report.build.comparison_rows`).
    thumbnails : int
        Images per section.
    every : bool
        Confusions and mistakes for every classifier, not only the best.
    """
    thumbs = Thumbnails(Path(report["data"]["dataset_root"]), limit=max(200, 40 * thumbnails))
    classes = [str(c) for c in report["data"]["class_names"]]
    best = int(data["best"])
    parts = [f"<h1>Classifier report</h1><p>Store <code>{html.escape(report['store'])}</code> of "
             f"<code>{html.escape(report['data']['dataset_root'])}</code>; {report['data']['classes']} classes, "
             f"{report['data']['n_train']} training and {report['data']['n_test']} test images; split: "
             f"{html.escape(report['data']['split'])}. Seed {report['seed']}, "
             f"made {html.escape(report['created'])}.</p>"]
    parts.append(_provenance(report))
    parts.append(_comparison(rows, report, best))
    parts.append(_leak_warning(report))
    chosen = range(len(report["results"])) if every else [best]
    for number in chosen:
        parts.append(_confusions(report, data, number, classes, thumbs, thumbnails, out))
        parts.append(_mistakes(report, data, number, classes, thumbs, thumbnails))
    findings = report.get("findings", {})
    parts.append(f"<h2>Map of the embeddings ({html.escape(findings.get('features', ''))})</h2>"
                 + embedded_png(out / findings.get("map", "map.png"), "map of the embeddings")
                 + "<p>PCA to 50 dimensions, then t-SNE, of a seeded sample; colours are classes, black crosses the "
                 "test images the best classifier gets wrong.</p>")
    if report.get("learning_curve"):
        parts.append("<h2>Learning curve</h2>"
                     + embedded_png(out / report["learning_curve"]["figure"], "learning curve")
                     + f"<p>{html.escape(report['learning_curve']['description'])}</p>")
    parts.append(_leaks(report, data, thumbs, thumbnails))
    parts.append(_duplicates(report, data, classes, thumbs, thumbnails))
    parts.append(_label_issues(report, data, classes, thumbs, thumbnails))
    body = "\n".join(part for part in parts if part)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Classifier report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _provenance(report: dict[str, Any]) -> str:
    items = []
    for name, source in report["features"].items():
        text = f"<b>{html.escape(name)}</b>: {html.escape(source['description'])}"
        if source.get("untrained"):
            text = (f'<span class="untrained">{html.escape(name)}: UNTRAINED random weights</span> '
                    f"({html.escape(source['description'])}); these scores say nothing about transfer learning")
        items.append(f"<li>{text}</li>")
    return "<h2>Where the features come from</h2><ul>" + "".join(items) + "</ul>"


def _comparison(rows: Sequence[Sequence[str]], report: dict[str, Any], best: int) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = []
    for number, row in enumerate(rows[1:]):
        mark = ' class="best"' if number == best else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    result = report["results"][best]
    return (f"<h2>Comparison on the test part</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            f"<p>Best by validation score, as classify chooses: <b>{html.escape(result['features'])} + "
            f"{html.escape(result['classifier'])}</b> (highlighted). The test part chose nothing.</p>")


def _leak_warning(report: dict[str, Any]) -> str:
    leaks = report.get("findings", {}).get("leaks", {})
    if not leaks.get("pairs"):
        return ""
    without = leaks["accuracy_without"]
    rescored = (f"Test accuracy of the best classifier without them: {without:.3f} (with them "
                f"{leaks['accuracy_with']:.3f})." if without == without else "No test image is left without one.")
    return (f'<p class="warn">{leaks["held_out_images"]} held-out images also appear in the training part '
            f"({leaks['exact']} exact duplicates, {leaks['near']} near duplicates): the test score is "
            f"optimistic. {rescored}</p>")


def _test_rows(data: dict[str, np.ndarray]) -> np.ndarray:
    return np.flatnonzero(data["part"] == "test")


def _confusions(report: dict[str, Any], data: dict[str, np.ndarray], number: int, classes: list[str],
                thumbs: Thumbnails, count: int, out: Path) -> str:
    result = report["results"][number]
    title = f"{result['features']} + {result['classifier']}"
    if not result.get("test"):
        return ""
    figure = (embedded_png(out / result["confusion_figure"], f"confusion matrix of {title}")
              if result["confusion_figure"] else "")
    rows = _test_rows(data)
    predicted = data[f"proba{number}"].argmax(axis=1)
    truth = data["labels"][rows]
    confusion = np.array(result["test"]["confusion"])
    cells = [(confusion[i, j], i, j) for i in range(len(classes)) for j in range(len(classes))
             if i != j and confusion[i, j]]
    blocks = []
    for _, i, j in sorted(cells, reverse=True)[: max(count, 1) * 2]:
        wrong = rows[(truth == i) & (predicted == j)][:count]
        pictures = "".join(thumbs(str(data["paths"][r])) for r in wrong)
        blocks.append(f'<div class="cell"><h3>true {html.escape(classes[i])}, predicted {html.escape(classes[j])} '
                      f'({confusion[i, j]})</h3><div class="thumbs">{pictures}</div></div>')
    listed = (f'<div class="cells">{"".join(blocks)}</div>' if blocks
              else '<p class="none">No confusions: every test image is right.</p>')
    return f"<h2>Confusions of {html.escape(title)}</h2>{figure}{listed}"


def _mistakes(report: dict[str, Any], data: dict[str, np.ndarray], number: int, classes: list[str],
              thumbs: Thumbnails, count: int) -> str:
    result = report["results"][number]
    if not result.get("test"):
        return ""
    probabilities = data[f"proba{number}"]
    rows = _test_rows(data)
    predicted, truth = probabilities.argmax(axis=1), data["labels"][rows]
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][: max(count, 1) * 2]
    lines = [
        f"<tr><td>{thumbs(str(data['paths'][rows[k]]), '')}</td><td>{html.escape(classes[truth[k]])}</td>"
        f"<td>{html.escape(classes[predicted[k]])}</td><td>{probabilities[k, predicted[k]]:.3f}</td>"
        f"<td>{html.escape(str(data['paths'][rows[k]]))}</td></tr>"
        for k in wrong
    ]
    title = f"{result['features']} + {result['classifier']}"
    if not lines:
        return (f'<h2>Most confident mistakes of {html.escape(title)}</h2>'
                '<p class="none">None: no test image is wrong.</p>')
    return (f"<h2>Most confident mistakes of {html.escape(title)}</h2><table><tr><th>image</th><th>true</th>"
            f"<th>predicted</th><th>probability</th><th>path</th></tr>{''.join(lines)}</table>")


def search_text(findings: dict[str, Any]) -> str:
    """How the pairs behind leaks and duplicates were found, in words: per feature set its threshold, its search
    and that search's measured recall."""
    leaks = findings.get("leaks", {})
    searches = []
    for name, threshold in leaks.get("searched", {}).items():
        search = leaks.get("search", {}).get(name, {})
        recall = ""
        if search.get("recall_pairs"):
            recall = f", measured recall {search['recall']:.3f} on {counted(search['recall_pairs'], 'pair')}"
        elif not search.get("method", "").startswith("exact") and search:
            recall = ", recall not measured: its seeded sample met no pair"
        searches.append(f"{name} at {threshold:.2f}: {search.get('method', 'exact')}{recall}")
    return (
        "Exact duplicates by sha256, then near duplicates: cosine similarity of embeddings centred on the feature "
        f"set's mean and L2-normalised, at or above a threshold per feature set ({'; '.join(searches) or 'none'}), "
        "through the set's neighbor index over every image of the store (an untrained backbone's embeddings are "
        "not searched: they cannot tell near duplicates from other images)."
    )


def _leaks(report: dict[str, Any], data: dict[str, np.ndarray], thumbs: Thumbnails, count: int) -> str:
    findings = report.get("findings", {})
    leaks = findings.get("leaks", {})
    head = "<h2>Leaks between the training and held-out parts</h2>"
    rule = f"<p>{html.escape(search_text(findings))} Every pair is in leaks.csv beside this page.</p>"
    if not leaks.get("pairs"):
        return head + rule + '<p class="none">None found.</p>'
    lines = []
    for k in range(min(len(data["leak_held_out"]), max(count, 1) * 2)):
        held, train = int(data["leak_held_out"][k]), int(data["leak_train"][k])
        kind = ("exact (sha256)" if data["leak_exact"][k]
                else f"{data['leak_similarity'][k]:.3f} ({data['leak_source'][k]})")
        lines.append(f"<tr><td>{thumbs(str(data['paths'][held]), str(data['part'][held]))}</td>"
                     f"<td>{thumbs(str(data['paths'][train]), 'train')}</td><td>{kind}</td>"
                     f"<td>{html.escape(str(data['paths'][held]))}<br>{html.escape(str(data['paths'][train]))}</td></tr>")
    return (head + rule + f"<p>{counted(leaks['pairs'], 'pair')}.</p><table><tr><th>held out</th><th>training</th>"
            f"<th>similarity</th><th>paths</th></tr>{''.join(lines)}</table>")


def _duplicates(report: dict[str, Any], data: dict[str, np.ndarray], classes: list[str], thumbs: Thumbnails,
                count: int) -> str:
    findings = report.get("findings", {})
    if "duplicates" not in findings or "duplicate_group" not in data:
        return ""  # a fit of an earlier version
    members = data["duplicate_rows"]
    label_names = np.array(classes, dtype=object)
    captions = captions_of(label_names[data["labels"][members]], data["part"][members], data["duplicate_similarity"],
                           data["duplicate_exact"])
    rule = ("<p>Groups of the same or nearly the same image among the split's images, any part: pairs found as for "
            "leaks above, members linked by a chain of them; largest first. All of them are in duplicates.csv beside "
            "this page.</p>")
    return duplicates_section(data["duplicate_group"], data["paths"][members], captions, thumbs, max(count, 1) * 2,
                              rule)


def duplicates_section(group: np.ndarray, paths: np.ndarray, captions: Sequence[str], thumbs: Thumbnails,
                       groups: int, rule: str) -> str:
    """The page section: the first ``groups`` groups as rows of thumbnails, after ``rule`` (HTML) saying how they
    were found."""
    head = "<h2>Duplicates</h2>" + rule
    if not len(group):
        return head + '<p class="none">None found.</p>'
    blocks = []
    for number in range(min(int(group.max()) + 1, groups)):
        members = np.flatnonzero(group == number)
        pictures = "".join(thumbs(str(paths[m]), captions[m]) for m in members[:12])
        more = " (the first 12 shown)" if len(members) > 12 else ""
        blocks.append(f'<div class="cell"><h3>group {number}: {len(members)} images{more}</h3>'
                      f'<div class="thumbs">{pictures}</div></div>')
    total = int(group.max()) + 1
    shown = f"; the {groups} largest shown" if total > groups else ""
    return head + f"<p>{counted(total, 'group')} of {counted(len(group), 'image')}{shown}.</p>" + "".join(blocks)


def captions_of(labels: np.ndarray, splits: np.ndarray, similarity: np.ndarray, exact: np.ndarray) -> list[str]:
    """Each member's caption: its label and split, and how it joined the group."""
    return [" ".join(filter(None, [str(label), str(split), "same file" if same else f"{score:.3f}"]))
            for label, split, score, same in zip(labels, splits, similarity, exact)]


def _label_issues(report: dict[str, Any], data: dict[str, np.ndarray], classes: list[str], thumbs: Thumbnails,
                  count: int) -> str:
    issues = report.get("findings", {}).get("label_issues", {})
    head = "<h2>Likely label errors</h2>"
    if "count" not in issues:
        return head + f'<p class="none">{html.escape(issues.get("note", "Not looked for."))}</p>'
    rule = (f"<p>Out-of-fold probabilities of the training images ({html.escape(issues['method'])}), by confident "
            "learning as cleanlab's find_label_issues does it: the confident joint, calibrated to the class sizes, "
            "estimates how many images of each given label belong to each other class; that many, those with the "
            "largest margin for the other class, are listed, unless the classifier agrees with their given label; "
            "lowest probability of the given label first. All of them are in label-issues.csv beside this page.</p>")
    if not issues["count"]:
        return head + rule + '<p class="none">None found.</p>'
    lines = []
    for k in range(min(len(data["issue_rows"]), max(count, 1) * 2)):
        row, suggested = int(data["issue_rows"][k]), int(data["issue_suggested"][k])
        given = int(data["labels"][row])
        probabilities = data["issue_probabilities"][k]
        lines.append(f"<tr><td>{thumbs(str(data['paths'][row]), '')}</td><td>{html.escape(classes[given])} "
                     f"({probabilities[given]:.2f})</td><td>{html.escape(classes[suggested])} "
                     f"({probabilities[suggested]:.2f})</td><td>{html.escape(str(data['paths'][row]))}</td></tr>")
    return (head + rule + f"<p>{issues['count']} images.</p><table><tr><th>image</th><th>given label</th>"
            f"<th>suggested</th><th>path</th></tr>{''.join(lines)}</table>")
