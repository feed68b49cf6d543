"""``mtf report``: one self-contained HTML page (PNG figures embedded as data URIs, no script, no network)
plus the same figures as PNG files, for one run or several runs side by side.

Sections, each an element with a fixed id (the tests look for them): ``run`` (status, times, stop
reason, checkpoints), ``training`` (curves), ``eval`` (curves and the final per-template table),
``mixture`` (planned vs realised shares, epochs, truncations and drops) and ``config`` (the resolved
config; with several runs, the keys where they differ first).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from train.reports import plots
from train.reports.rundata import RunData, mixture_table, packing_losses, protocol_label, read_run, series

SECTIONS = ("run", "training", "eval", "mixture", "config")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; line-height: 1.4; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px;
margin-top: 32px; } h3 { font-size: 15px; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } .note { background: #fff6db; border-left: 4px solid #e0b000;
padding: 6px 10px; margin: 6px 0; font-size: 13px; } .muted { color: #777; font-size: 13px; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; } nav a { margin-right: 14px; }
.best { font-weight: 600; }
"""


def write_report(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None) -> dict:
    """Read the runs, draw the figures, write ``index.html`` and the PNGs under ``out``.

    Args:
        run_dirs: one or more run directories (``run.output_dir``).
        out: output folder; default ``<run>/report`` for one run, ``./mtf-report`` for several.

    Returns:
        {"html": path, "pngs": [paths], "notes": {run name: [notes]}, "runs": [names]}.
    """
    runs = [read_run(p) for p in run_dirs]
    _unique_names(runs)
    out = Path(out) if out is not None else (Path(run_dirs[0]) / "report" if len(runs) == 1 else Path("mtf-report"))
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: fn(runs, out / name) for name, fn in plots.PLOTS.items()}
    page = render(runs, {name: p.read_bytes() for name, p in pngs.items()})
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"html": str(index), "pngs": [str(p) for p in pngs.values()], "runs": [r.name for r in runs],
            "notes": {r.name: r.notes for r in runs}}


def _unique_names(runs: list[RunData]) -> None:
    """Two runs with the same directory name (a/run, b/run) get their parent's name prefixed."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"


# ------------------------------------------------------------------------------------------- render


def render(runs: Sequence[RunData], images: dict[str, bytes]) -> str:
    title = "mtf report: " + ", ".join(r.name for r in runs)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='muted'>written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
             f"<code>mtf report</code> from {', '.join(f'<code>{_e(str(r.path))}</code>' for r in runs)}</p>",
             "<nav>" + "".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS) + "</nav>"]
    for run in runs:
        for note in run.notes:
            parts.append(f"<div class='note'><b>{_e(run.name)}</b>: {_e(note)}</div>")
    parts += [_run_section(runs), _training_section(runs, images["training.png"]),
              _eval_section(runs, images["eval.png"]), _mixture_section(runs, images["mixture.png"]),
              _config_section(runs), "</body></html>"]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = " class='num'" if i >= numeric_from else ""
            cells.append(f"<td{cls}>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _run_section(runs: Sequence[RunData]) -> str:
    keys = ["directory", "status", "steps", "started", "last update", "run time", "train loop", "stop reason", "error",
            "batch plan", "model kind", "checkpoints", "exports", "to continue"]
    columns = []
    for run in runs:
        r = run.record
        ckpts = "<br>".join(f"<code>{_e(c['path'])}</code>" + ("" if c["complete"] else " (incomplete)")
                            for c in run.checkpoints) or "none"
        exports = "<br>".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in run.exports.items()) or "none"
        status = run.status
        cont = ("–" if status == "completed" else
                f"<code>mtf train {_e(str(run.path))}/config.yaml run.output_dir={_e(str(run.path))}</code> "
                "resumes from the newest complete checkpoint" if run.checkpoints else "–")
        columns.append([f"<code>{_e(str(run.path))}</code>", _e(status),
                        f"{run.last_step:,} of {_fmt(run.max_steps)}", _e(r.get("started_at", "–")),
                        _e(r.get("updated_at", "–")), _duration(r.get("elapsed_seconds")),
                        _duration(r.get("train_loop_seconds")), _e(r.get("stop_reason") or "–"),
                        _e(r.get("error") or "–"), _e(r.get("batch_plan", "–")), _e(r.get("model_kind", "–")),
                        ckpts, exports, cont])
    rows = [[f"<b>{k}</b>"] + [col[i] for col in columns] for i, k in enumerate(keys)]
    return ("<section id='run'><h2>Run</h2>"
            + _table([""] + [r.name for r in runs], rows, numeric_from=99) + "</section>")


def _training_section(runs: Sequence[RunData], image: bytes) -> str:
    rows = []
    for run in runs:
        _, loss = series(run, "train/loss")
        _, tps = series(run, "tokens_per_second")
        _, eff = series(run, "packing/efficiency")
        last = run.train[-1] if run.train else {}
        rows.append([_e(run.name), _fmt(last.get("step")), _fmt(loss[-1] if loss else None),
                     _fmt(min(loss) if loss else None), _fmt(sum(tps) / len(tps) if tps else None),
                     _fmt(sum(eff) / len(eff) if eff else None, 3), _fmt(last.get("tokens_seen")),
                     _fmt(last.get("examples_seen"))])
    table = _table(["run", "last logged step", "last loss", "lowest loss", "mean real tokens/s",
                    "mean packing efficiency", "tokens", "examples"], rows)
    return ("<section id='training'><h2>Training</h2>"
            "<p class='muted'>Loss: thin line the logged values (the mean over each logging window), thick line "
            f"a centred moving mean over 1/{plots.SMOOTHING} of the points; log scale.</p>{_img(image, 'training curves')}{table}</section>")


def _language_grid(finals: dict, names: list[str]) -> str:
    """Per language and prompt setting, each run's mean of dataset medians (BLOOMZ's XCOPA table); empty when
    no eval group has a prompt setting (``metadata.prompts``)."""
    settings = sorted({p for n in names for p in finals[n].get("prompt_settings") or {}})
    if not settings:
        return ""
    zero_shot = {code for n in names for code in finals[n].get("zero_shot_languages") or ()}
    languages = sorted({g.partition("@")[0] for n in names for g in finals[n].get("languages", {}) if "@" in g})
    rows = []
    for language in languages:
        cells = [_pct(finals[n].get("languages", {}).get(f"{language}@{p}", {}).get("mean")) for p in settings for n in names]
        rows.append([_e(language)] + (["yes" if language in zero_shot else "no"] if zero_shot else []) + cells)
    head = ["language"] + (["zero-shot"] if zero_shot else []) + [
        f"{p} prompts" + (f": {n}" if len(names) > 1 else "") for p in settings for n in names]
    return ("<h3>Per language and prompt setting (%, mean of the dataset medians)</h3>"
            "<p class='muted'>Each dataset@prompts group is the median over its templates; zero-shot languages are "
            "the eval mixture's <code>eval.held_out_languages</code>.</p>"
            + _table(head, rows, numeric_from=2 if zero_shot else 1))


def _eval_section(runs: Sequence[RunData], image: bytes) -> str:
    parts = ["<section id='eval'><h2>Zero-shot evaluation</h2>", _img(image, "evaluation curves")]
    finals = {run.name: run.evals[-1] for run in runs if run.evals}
    if not finals:
        parts.append("<p class='muted'>No evaluation results in these runs.</p></section>")
        return "".join(parts)
    names = [r.name for r in runs if r.name in finals]
    datasets = sorted({d for f in finals.values() for d in f["datasets"]})
    # Per dataset: the final median over templates of each run (side by side), the best one in bold.
    rows = []
    for d in datasets:
        values = [finals[n]["datasets"].get(d, {}).get("median") for n in names]
        best = max((v for v in values if v is not None), default=None)
        cells = [(f"<span class='best'>{_pct(v)}</span>" if len(names) > 1 and v is not None and v == best else _pct(v))
                 for v in values]
        meta = finals[names[0]]["datasets"].get(d, {})
        rows.append([_e(d), _e(meta.get("prompts") or "–"), _fmt(meta.get("num_templates"))] + cells)
    steps = ", ".join(f"{_e(n)}: step {finals[n].get('step')}" for n in names)
    parts.append(f"<h3>Final results: {_e(protocol_label(runs))} (%)</h3><p class='muted'>{steps}</p>")
    parts.append(_table(["dataset", "prompts", "templates"] + names, rows, numeric_from=2))
    parts.append(_language_grid(finals, names))
    # Per template: score (and length-normalised) per run.
    rows = []
    for d in datasets:
        templates = sorted({t for n in names for t in finals[n]["templates"].get(d, {})})
        for t in templates:
            cells, chance, n_rows = [], None, None
            for n in names:
                row = finals[n]["templates"].get(d, {}).get(t)
                if row is None:
                    cells.append("–")
                    continue
                chance = row.get("chance", chance)
                n_rows = row.get("n", n_rows)
                ln = row.get("accuracy_length_normalized")
                cells.append(_pct(row.get("score")) + (f" <span class='muted'>({_pct(ln)})</span>" if ln is not None else ""))
            rows.append([_e(d), _e(t), _fmt(n_rows), _pct(chance) if chance is not None else "–"] + cells)
    parts.append("<h3>Final results per template (%; length-normalised in brackets)</h3>")
    parts.append(_table(["dataset", "template", "n", "chance"] + names, rows, numeric_from=2))
    return "".join(parts) + "</section>"


def _mixture_section(runs: Sequence[RunData], image: bytes) -> str:
    parts = ["<section id='mixture'><h2>Mixture</h2>",
             "<p class='muted'>Planned: the stream's rates from run.json (token share: rates weighted by each task's mean "
             "tokens per example as trained). Realised: what the run trained on so far. Epochs: examples trained on / "
             "prompted examples of the task.</p>", _img(image, "mixture composition")]
    for run in runs:
        table = mixture_table(run)
        parts.append(f"<h3>{_e(run.name)}</h3>")
        if not table:
            parts.append("<p class='muted'>No mixture information (no run.json, no tasks/* metrics).</p>")
            continue
        rows = [[_e(r["task"]), _pct(r["planned_examples"]), _pct(r["realised_examples"]), _pct(r["planned_tokens"]),
                 _pct(r["realised_tokens"]), _fmt(r["examples_seen"]), _fmt(r["tokens_seen"]),
                 _fmt(r["dataset_examples"]), _fmt(r["epochs"], 3)] for r in table]
        parts.append(_table(["task", "planned % examples", "realised % examples", "planned % tokens",
                             "realised % tokens", "examples trained", "tokens trained", "prompted examples", "epochs"],
                            rows))
        losses = packing_losses(run)
        if losses:
            parts.append("<p>Truncated or dropped so far: " + ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in losses.items())
                         + "</p>")
    return "".join(parts) + "</section>"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _config_section(runs: Sequence[RunData]) -> str:
    import yaml

    parts = ["<section id='config'><h2>Config</h2>"]
    if len(runs) > 1:
        flat = [_flatten(r.config) for r in runs]
        keys = sorted({k for f in flat for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
                  and not k.startswith("run.")]
        if differ:
            parts.append("<h3>Where the runs differ</h3>")
            parts.append(_table(["key"] + [r.name for r in runs],
                                [[f"<code>{_e(k)}</code>"] + [_e(_fmt(f.get(k))) for f in flat] for k in differ],
                                numeric_from=99))
        else:
            parts.append("<p class='muted'>The runs' configs are the same apart from `run.*`.</p>")
    for run in runs:
        text = yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no config.yaml)"
        parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>{_e(run.name)}: resolved config "
                     f"(<code>config.yaml</code>)</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts) + "</section>"
