"""Metric logging for training recipes: stdout lines, ``metrics.jsonl``, wandb, TensorBoard, tqdm, ``metrics.png``.

Every event is one JSON object per line in ``<output_dir>/metrics.jsonl`` with ``step`` and ``time`` (seconds
since the logger started) plus its values, e.g. ``{"step": 10, "loss": 2.1, "lr": 0.001, ...}`` or
``{"step": 100, "val/zero_shot_acc": 0.93, ...}``. Only rank 0 writes or prints; other ranks' calls are no-ops.

wandb (``log.wandb: true`` or a dict of ``wandb.init`` arguments) is imported only when configured and runs in
``offline`` mode unless the config or ``WANDB_MODE`` says otherwise: nothing leaves the machine by default.
TensorBoard (``log.tensorboard: true``) is optional too. ``close()`` draws ``metrics.png`` with PIL.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from mmtrain.errors import ConfigError

# Order and format of the keys on a stdout line; others follow as they come.
_LINE_FORMATS = {
    "loss": "loss {:.4f}", "lr": "lr {:.2e}", "samples_per_s": "{:.1f} samples/s", "grad_norm": "grad_norm {:.3f}",
    "peak_mem_gib": "mem {:.2f}GiB", "mfu": "mfu {:.1%}", "data_wait": "data wait {:.0%}",
}
EVAL_CURVES = ("val/zero_shot_acc", "val/i2t_r@1", "val/t2i_r@1")


class MetricLogger:
    """Writes metrics to every configured sink.

    Args:
        output_dir: run folder (``metrics.jsonl``, ``metrics.png``, wandb/TensorBoard files go there).
        rank: process rank; only rank 0 logs.
        total_steps: for the progress bar and ``step k/N`` lines.
        wandb: False/None, True, or a mapping of ``wandb.init`` arguments (``project``, ``name``, ``mode`` ...).
        tensorboard: write TensorBoard event files to ``output_dir/tensorboard``.
        run_config: the resolved run config (a plain dict) given to wandb.
        progress_bar: show a tqdm bar (on a terminal only).
        stream: where the lines go (stdout).
    """

    def __init__(self, output_dir: str | os.PathLike, *, rank: int = 0, total_steps: int | None = None,
                 wandb: bool | Mapping[str, Any] | None = None, tensorboard: bool = False,
                 run_config: Mapping[str, Any] | None = None, progress_bar: bool = True,
                 stream: TextIO | None = None, start_step: int = 0) -> None:
        self.enabled = rank == 0
        self.output_dir = Path(output_dir)
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self.png_path = self.output_dir / "metrics.png"
        self._start = time.perf_counter()
        self._wandb_run = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            self.forget_after(start_step)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if wandb:
            self._wandb_run = _init_wandb(wandb, self.output_dir, run_config)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"log.tensorboard=true needs the tensorboard package ({e})") from None
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            # disable=None: the bar shows on a terminal and stays out of captured logs.
            self._bar = tqdm(total=total_steps, initial=start_step, disable=None, dynamic_ncols=True,
                             leave=False, file=sys.stderr)

    def forget_after(self, step: int) -> None:
        """Drop the rows of steps after ``step`` from ``metrics.jsonl``: a run resumed at ``step`` logs them again
        (a resumed run repeats the interrupted one), and the file and its plot should hold each step once."""
        if not self.enabled or not self.jsonl_path.exists():
            return
        kept = [r for r in read_metrics(self.jsonl_path) if not isinstance(r.get("step"), int) or r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text == self.jsonl_path.read_text(errors="replace"):
            return  # (a line cut by a killed run is dropped too, so the next row starts a line of its own)
        reopen = hasattr(self, "_jsonl") and not self._jsonl.closed
        if reopen:
            self._jsonl.close()
        tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.jsonl_path)
        if reopen:
            self._jsonl = open(self.jsonl_path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, Any], *, echo: bool = True, prefix: str = "") -> None:
        """Record one event at ``step``; ``echo`` also prints a line (``prefix`` e.g. ``"eval"``)."""
        if not self.enabled:
            return
        values = {k: _plain(v) for k, v in metrics.items() if v is not None}
        record = {"step": int(step), "time": round(time.perf_counter() - self._start, 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=int(step))
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, int(step))
        if echo:
            self.print(self.format_line(step, values, prefix))

    def format_line(self, step: int, values: Mapping[str, Any], prefix: str = "") -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"{prefix + ' ' if prefix else ''}step {step}{total}"]
        for key, fmt in _LINE_FORMATS.items():
            if isinstance(values.get(key), (int, float)):
                parts.append(fmt.format(values[key]))
        for key, value in values.items():
            if key in _LINE_FORMATS:
                continue
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        return " | ".join(parts)

    def print(self, line: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        if self.enabled and self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                      refresh=False)

    def close(self, plot: bool = True) -> Path | None:
        """Flush and close every sink; draw ``metrics.png`` (returned) when ``plot``."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if plot:
            return plot_metrics(self.jsonl_path, self.png_path)
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def _init_wandb(settings: bool | Mapping[str, Any], output_dir: Path, run_config: Mapping[str, Any] | None):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"log.wandb: the wandb package is not importable ({e})") from None
    kwargs = dict(settings) if isinstance(settings, Mapping) else {}
    kwargs.setdefault("mode", os.environ.get("WANDB_MODE", "offline"))
    kwargs.setdefault("project", "mmtrain")
    kwargs.setdefault("dir", str(output_dir))
    if run_config is not None:
        kwargs.setdefault("config", dict(run_config))
    return wandb.init(**kwargs)


# ------------------------------------------------------------------------------------------ plotting
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a killed run: skip it
    return records


def final_values(path: str | os.PathLike, step: int) -> tuple[float | None, dict[str, Any]]:
    """From a run's metrics.jsonl: the last logged training loss and the ``val/`` values logged at ``step`` (the
    final evaluation), for the summary of a run that is already complete."""
    records = read_metrics(path) if Path(path).exists() else []
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    final_eval: dict[str, Any] = {}
    for record in records:
        if record.get("step") == step and any(k.startswith("val/") for k in record):
            final_eval = {k: v for k, v in record.items() if k.startswith("val/")}
    return (losses[-1] if losses else None), final_eval


def plot_metrics(jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                 eval_keys: tuple[str, ...] = EVAL_CURVES) -> Path | None:
    """Draw ``loss`` (left) and the eval curves (right) from a metrics.jsonl into a PNG; None if nothing to draw."""
    from PIL import Image, ImageDraw

    records = read_metrics(jsonl_path) if Path(jsonl_path).exists() else []
    loss = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in eval_keys}
    evals = {k: v for k, v in evals.items() if v}
    if not loss and not evals:
        return None
    width, height = 1000, 420
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (0, 0, width // 2, height), "train loss", {"loss": loss} if loss else {})
    _panel(draw, (width // 2, 0, width, height), "validation", evals)
    png_path = Path(png_path)
    image.save(png_path)
    return png_path


def _panel(draw, box: tuple[int, int, int, int], title: str, series: dict[str, list[tuple[float, float]]]) -> None:
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 70, top + 35, right - 20, bottom - 70  # plot area
    draw.text((left + 70, top + 10), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data", fill="gray")
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    for i in range(5):  # grid and tick labels
        frac = i / 4
        y = y1 - frac * (y1 - y0)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((left + 5, y - 6), f"{ymin + frac * (ymax - ymin):.3g}", fill="black")
        x = x0 + frac * (x1 - x0)
        draw.text((x - 10, y1 + 5), f"{xmin + frac * (xmax - xmin):.0f}", fill="black")
    draw.text(((x0 + x1) // 2 - 10, y1 + 22), "step", fill="black")
    for i, (name, values) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pixels = [to_px(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels if len(pixels) <= 50 else pixels[-1:]:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        draw.line((x0 + 10 + 150 * i, bottom - 22, x0 + 30 + 150 * i, bottom - 22), fill=color, width=3)
        draw.text((x0 + 35 + 150 * i, bottom - 28), name, fill="black")
