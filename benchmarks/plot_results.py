"""Speed-up plot and Markdown results table from every benchmarks/results/*.json.

Reads the results files of benchmarks/layer.py (records {"kind": "layer", "shape": [K, N], "M",
"r", "method", "pass": "fwd" | "fwd_bwd", "ms"}), benchmarks/model.py ({"kind": "model", "model",
"tokens", "method", "s_per_step", "tokens_per_s", "peak_gib", "update_ms", "final_loss", and
from the adapter mode on "first_loss", "loss_steps", "lr"} and {"kind": "meld", "model",
"seconds", and from meld while loading on "source": "memory" | "synthetic" | "disk", "peak_gib",
"page_cache"}) and benchmarks/distributed.py ({"kind": "distributed", "mode", "gpus",
"method", "tokens_per_s", "scaling", "peak_gib", "peak_ratio", "ranks_identical"}); any record may instead carry {"skipped": reason}, a model record that cannot fit
the device also {"fits": false, "needs_bytes"}. Where several files hold the same
measurement on the same device, the newest file's (by its "date") is used. Methods that a file
lacks (falqon_adapter in files older than the adapter mode, say) are simply not shown. Speed-ups
stay within one run: each layer table is one file's, over that file's bf16_lora, and a model
row's speed-up is over its own file's bf16_lora where that file measured one.

Writes benchmarks/results/speedup.png (speed-up over bf16_lora per method: one layer's fwd+bwd per
shape at one M and r, and the model's training step), and rewrites the Markdown between
`<!-- results:begin -->` and `<!-- results:end -->` in README.md; where README.md has no such
markers, the table goes to docs/results_snippet.md instead (markers included, to paste).

    python benchmarks/plot_results.py                  # M = 8192, r = 64 in the layer panel
    python benchmarks/plot_results.py --M 2048 --r 16
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
from collections import defaultdict

REPO = pathlib.Path(__file__).resolve().parents[1]
BASELINE = "bf16_lora"
KINDS = ("layer", "model", "meld", "distributed")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# Methods in this order first (the rest as they come), so that colours and columns stay put.
PREFERRED = ("bf16_lora", "falqon", "falqon_wt", "falqon_delayed", "falqon_delayed_wt",
             "falqon_adapter", "falqon_adapter_delayed", "falqon_adapter_delayed_wt", "fp8_floor",
             "qlora_nf4", "fp8_lora_torchao", "fp8_lora_torchao_eager", "bf16_lora_liger",
             "qlora_nf4_liger",
             "falqon_fused", "falqon_fused_liger", "falqon_fused_compile",
             "falqon_fused_cudagraphs")


# ---- reading ------------------------------------------------------------------------------------

def load_records(results_dir: pathlib.Path) -> tuple[list[dict], dict]:
    """(records, {device: {"torch": {...}, "date": newest}}) of every results file; each record
    gets its file's "device", "date" and "file", and a layer or model record its own file's
    bf16_lora measurement of the same shape or model as "run_base" where that file has one.
    Measurements repeated across files keep the newest file's."""
    newest: dict[tuple, dict] = {}
    run_bases: dict[tuple, dict] = {}  # (file, record key) -> that file's BASELINE record
    devices: dict[str, dict] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"plot_results: skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            continue  # not a results file
        device, date = str(data.get("device", "unknown")), str(data.get("date", ""))
        for r in data["records"]:
            if not isinstance(r, dict) or r.get("kind") not in KINDS:
                continue  # a profile's records, say
            info = devices.setdefault(device, {"torch": set(), "date": ""})
            info["torch"].add(str(data.get("torch", "?")))
            info["date"] = max(info["date"], date)
            r = {**r, "device": device, "date": date, "file": path.name}
            if r["kind"] == "model":
                if r.get("lr") is None:  # files before the record's lr
                    r["lr"] = file_lr(data)
                # (files before --checkpointing ran transformers' default, non-reentrant)
                r["checkpointing"] = (data.get("config") or {}).get("checkpointing",
                                                                    "non_reentrant")
            key = record_key(r)
            if r.get("method") == BASELINE and ran(r):
                run_bases[(path.name, key)] = r
            if key in newest and newest[key]["file"] == path.name and ran(r) and \
                    ran(newest[key]):  # measured again in the same run: both are shown
                r["repeats"] = [*newest[key].get("repeats", [newest[key]["s_per_step"]]),
                                r["s_per_step"]]
            if key not in newest or newest[key]["date"] <= date:
                newest[key] = r
    for r in newest.values():
        if r["kind"] in ("layer", "model") and r["method"] != BASELINE:
            base = run_bases.get((r["file"], record_key({**r, "method": BASELINE})))
            if base is not None:
                r["run_base"] = base
    return list(newest.values()), devices


def file_lr(data: dict) -> float | None:
    """The learning rate of a model results file's config ({"optimizer": "AdamW(lr=0.0001)"})."""
    found = re.search(r"lr=([0-9.eE+-]+)", str((data.get("config") or {}).get("optimizer", "")))
    try:
        return float(found.group(1)) if found else None
    except ValueError:
        return None


def record_key(r: dict) -> tuple:
    if r["kind"] == "layer":
        return ("layer", r["device"], tuple(r["shape"]), r["M"], r["r"], r["pass"], r["method"])
    if r["kind"] == "model":
        return ("model", r["device"], r["model"], r["method"])
    if r["kind"] == "distributed":
        return ("distributed", r["device"], r["model"], r.get("batch_per_gpu"), r["mode"],
                r["method"])
    return ("meld", r["device"], r["model"], r.get("source", "memory"), r.get("page_cache"))


def ran(r: dict) -> bool:
    return "skipped" not in r


def method_order(records) -> list[str]:
    seen = {r["method"] for r in records if "method" in r}
    return [m for m in PREFERRED if m in seen] + sorted(seen - set(PREFERRED))


def pick_layer_config(records, device, M, r) -> tuple[int, int] | None:
    """(M, r) of the layer panel on `device`: the one asked for, else the largest present."""
    have = {(x["M"], x["r"]) for x in records
            if x["kind"] == "layer" and x["device"] == device and x["pass"] == "fwd_bwd"}
    if not have:
        return None
    return (M, r) if (M, r) in have else max(have)


def layer_runs(records, device, M, r) -> list[tuple[str, str, dict[tuple, dict[str, dict]]]]:
    """The fwd+bwd layer tables on `device` at (M, r), one per results file, newest first:
    (file, date, {(K, N): {method: record}}). Each row holds the methods that file measured last
    and that file's own bf16_lora, so that a speed-up never compares two runs. A file left with
    its bf16_lora alone (a newer one measured everything else) gets no table."""
    runs: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for x in records:
        if (x["kind"] == "layer" and x["device"] == device and x["pass"] == "fwd_bwd"
                and x["M"] == M and x["r"] == r):
            row = runs.setdefault((x["date"], x["file"]), {}).setdefault(tuple(x["shape"]), {})
            row[x["method"]] = x  # in the order the benchmark ran them (7B shapes first)
            if "run_base" in x:
                row.setdefault(BASELINE, x["run_base"])
    tables = [(file, date, rows) for (date, file), rows in sorted(runs.items(), reverse=True)]
    others = [t for t in tables if any(set(row) - {BASELINE} for row in t[2].values())]
    return others or tables


def model_rows(records, device) -> dict[str, dict[str, dict]]:
    """{model: {method: record}}."""
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for x in records:
        if x["kind"] == "model" and x["device"] == device:
            rows[x["model"]][x["method"]] = x
    return dict(sorted(rows.items()))


def model_base(x: dict, table_base: dict | None) -> dict | None:
    """The bf16_lora step a model record's speed-up is over: its own run's where that run
    measured one, else the table's (the newest)."""
    return x.get("run_base") or table_base


def speedup(base: dict | None, other: dict | None, field: str) -> float | None:
    """base time / other time, or None where either did not run."""
    if not base or not other or not ran(base) or not ran(other):
        return None
    return base[field] / other[field]


def device_panels(records, devices, M, r):
    """Per device: (device, layer (M, r) or None, layer tables (layer_runs), model rows)."""
    for device in sorted(devices):
        cfg = pick_layer_config(records, device, M, r)
        layers = layer_runs(records, device, *cfg) if cfg else []
        yield device, cfg, layers, model_rows(records, device)


# ---- plot ---------------------------------------------------------------------------------------

def plot(records, devices, png: pathlib.Path, M: int, r: int) -> bool:
    """Grouped bars of speed-up over bf16_lora; False (nothing written) when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = method_order(records)
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colours = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    panels = []
    for device, cfg, layers, models in device_panels(records, devices, M, r):
        shapes: dict[tuple, dict[str, float | None]] = {}  # each over its own run's baseline
        for _, _, rows in layers:
            for shape, by_method in rows.items():
                base = by_method.get(BASELINE)
                for m, x in by_method.items():
                    shapes.setdefault(shape, {}).setdefault(m, speedup(base, x, "ms"))
        groups = [(f"{K}->{N}\nlayer fwd+bwd", g) for (K, N), g in shapes.items()]
        for name, by_method in models.items():
            base = by_method.get(BASELINE)
            groups.append((f"{name}\ntraining step",
                           {m: speedup(x, model_base(x, base), "tokens_per_s")
                            for m, x in by_method.items()}))
        # A model without its baseline (bf16 LoRA does not fit a 70B model) has no bars here.
        groups = [(label, g) for label, g in groups if any(v is not None for v in g.values())]
        if groups:
            panels.append((device, cfg, groups))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 1.6 * max(len(g) for _, _, g in panels) + 3.5),
                                      3.6 * len(panels)))
    for ax, (device, cfg, groups) in zip(axes[:, 0], panels):
        shown = [m for m in methods if any(g.get(m) is not None for _, g in groups)]
        width = 0.8 / max(len(shown), 1)
        for i, m in enumerate(shown):
            xs = [g + (i - (len(shown) - 1) / 2) * width for g in range(len(groups))]
            ys = [grp.get(m) for _, grp in groups]
            bars = ax.bar([x for x, y in zip(xs, ys) if y is not None],
                          [y for y in ys if y is not None], width, label=m, color=colours[m])
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
        ax.set_ylabel(f"speed-up over {BASELINE}")
        layer_note = f"layers at M = {cfg[0]} tokens, r = {cfg[1]}; " if cfg else ""
        ax.set_title(f"{device}: {layer_note}higher is faster", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.margins(y=0.15)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# ---- Markdown -----------------------------------------------------------------------------------

def _cell_time(x: dict | None, base: dict | None, field: str, fmt: str) -> str:
    if x is None:
        return "-"
    if not ran(x):
        return "skipped"
    s = speedup(base, x, field)
    return fmt.format(x[field]) + ("" if s is None or x is base else f" ({s:.2f}x)")


def _loss(x: dict) -> str:
    """The loss cell of a model record: "first -> final", or the final loss alone (files before
    first_loss), or "-"."""
    final = x.get("final_loss")
    if final is None:
        return "-"
    first = x.get("first_loss")
    return f"{final:.2f}" if first is None else f"{first:.2f} -> {final:.2f}"


def _loss_note(row: dict) -> str | None:
    """How the losses of a model table were taken (its records' lr and step count), or None."""
    ran_ = [x for x in row.values() if ran(x) and x.get("final_loss") is not None]
    if not ran_:
        return None
    lrs = sorted({"?" if x.get("lr") is None else f"{x['lr']:g}" for x in ran_})
    steps = sorted({x["loss_steps"] for x in ran_ if "loss_steps" in x})
    after = f", after {' / '.join(map(str, steps))} optimizer steps" if steps else ""
    return (f"Loss: training loss on one random batch repeated every step (AdamW, lr "
            f"{', '.join(lrs)}{after}); where it does not fall, the updates do not reach the "
            f"model.")


def _runs_note(row: dict) -> str | None:
    """Which runs a model table's rows come from, where they are more than one (speed-ups
    across runs then compare runs as well as methods)."""
    runs: dict[tuple, list[str]] = defaultdict(list)
    for m, x in row.items():
        runs[(x.get("date", "")[:10], x.get("file", "?"), x.get("checkpointing"))].append(m)
    repeats = [f"{m} {' / '.join(f'{t:.3f}' for t in x['repeats'])} s"
               for m, x in row.items() if x.get("repeats")]
    notes = []
    if len(runs) > 1:
        kinds = len({c for _, _, c in runs}) > 1  # say the checkpointing where runs differ in it
        parts = [f"{', '.join(ms)} from {f} ({d}{f', {c} checkpointing' if kinds else ''})"
                 for (d, f, c), ms in sorted(runs.items(), key=lambda kv: kv[0][:2])]
        notes.append("Rows from more than one run: " + "; ".join(parts) + ".")
        base = row.get(BASELINE)
        if any(x.get("run_base") not in (None, base) for x in row.values()):
            notes.append(f"A row's speed-up is over the {BASELINE} of its own run where that run "
                         f"measured one (the {BASELINE} row shows the newest).")
    if repeats:
        notes.append("Measured more than once in one run (in the order measured; the table "
                     "shows the last): " + "; ".join(repeats) + ".")
    return " ".join(notes) or None


def layer_tables(layers, cfg, methods, skipped: list) -> list[str]:
    """The Markdown of layer_runs' tables, each naming its results file and date."""
    out = []
    for file, date, rows in layers:
        cols = [m for m in methods if any(m in row for row in rows.values())]
        out += [f"One layer, forward + backward, M = {cfg[0]} tokens, r = {cfg[1]} ({file}, "
                f"{date[:10]}): ms (speed-up over {BASELINE} in the same run)", "",
                "| shape (K -> N) | " + " | ".join(cols) + " |",
                "| --- |" + " --- |" * len(cols)]
        for (K, N), row in rows.items():
            base = row.get(BASELINE)
            out.append(f"| {K} -> {N} | " + " | ".join(
                _cell_time(row.get(m), base, "ms", "{:.2f}") for m in cols) + " |")
            skipped += [(f"layer {K} -> {N}", x) for x in row.values() if not ran(x)]
        out.append("")
    if len(layers) > 1:
        out += ["Each layer table is one run of benchmarks/layer.py (one process); a method "
                "measured again in a newer run is shown from that run only.", ""]
    return out


def markdown(records, devices, M: int, r: int, image: str | None) -> str:
    methods = method_order(records)
    out = [BEGIN, "", "_Generated by `python benchmarks/plot_results.py` from "
           "benchmarks/results/*.json; edits here are overwritten._", ""]
    if not records:
        out += ["No results yet: run `python benchmarks/layer.py` and `python benchmarks/model.py` "
                "on a GPU, then this script.", "", END]
        return "\n".join(out)
    if image:
        out += [f"![speed-up over {BASELINE}]({image})", ""]
    for device, cfg, layers, models in device_panels(records, devices, M, r):
        info = devices[device]
        out += [f"### {device} (torch {', '.join(sorted(info['torch']))}; {info['date'][:10]})", ""]
        skipped = []
        out += layer_tables(layers, cfg, methods, skipped)
        for name, row in models.items():
            tokens = next((x["tokens"] for x in row.values() if ran(x) and "tokens" in x),
                          next((x["tokens"] for x in row.values() if "tokens" in x), None))
            out += [f"Training step of {name}" + (f", {tokens} tokens" if tokens else "") + ":", "",
                    "| method | s/step | tokens/s | peak GiB | proxy update ms | speed-up | loss |",
                    "| --- | --- | --- | --- | --- | --- | --- |"]
            base = row.get(BASELINE)
            for m in [m for m in methods if m in row]:
                x = row[m]
                if not ran(x):
                    why = "skipped" if x.get("fits", True) else \
                        f"does not fit (needs >= {x['needs_bytes'] / 2**30:.0f} GiB)"
                    out.append(f"| {m} | {why} | | | | | |")
                    skipped.append((name, x))
                    continue
                # tokens/s over the baseline's: the same as its time ratio at the same batch
                s = speedup(x, model_base(x, base), "tokens_per_s")
                peak = "-" if x.get("peak_gib") is None else f"{x['peak_gib']:.1f}"
                upd = f"{x['update_ms']:.1f}" if x.get("update_ms") is not None else "-"
                label = m if x.get("tokens") == tokens else f"{m} ({x.get('tokens')} tokens)"
                out.append(f"| {label} | {x['s_per_step']:.3f} | {x['tokens_per_s']:.0f} | "
                           f"{peak} | {upd} | {'-' if s is None else f'{s:.2f}x'} | "
                           f"{_loss(x)} |")
            note = _loss_note(row)
            out += ["", note] if note else []
            runs = _runs_note(row)
            out += [runs] if runs else []
            out.append("")
        for x in sorted((x for x in records if x["kind"] == "meld" and x["device"] == device),
                        key=lambda x: (x["model"], x.get("source", "memory"))):
            if ran(x):
                out.append(meld_line(x))
            else:
                skipped.append((f"meld of {x['model']}", x))
        out += distributed_tables(records, device, skipped)
        # One line per method and reason, naming every place it applies to.
        reasons: dict[tuple, list[str]] = defaultdict(list)
        for where, x in skipped:
            places = reasons[(x.get("method", "meld"), x["skipped"])]
            if where not in places:
                places.append(where)
        for (method, why), places in reasons.items():
            out.append(f"- not run: {method} ({', '.join(places)}): {why}")
        out.append("")
    out.append(END)
    return "\n".join(out)


def distributed_tables(records, device: str, skipped: list) -> list[str]:
    """benchmarks/distributed.py's records on `device`, one table per model and batch."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for x in records:
        if x["kind"] == "distributed" and x["device"] == device:
            groups[(x["model"], x.get("batch_per_gpu"), x.get("seq"))].append(x)
    out = []
    order = {"single": 0, "ddp": 1, "fsdp2": 2, "fsdp2_offload": 3}
    for (model, batch, seq), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        out += ["", f"Several GPUs, {model}, {batch} x {seq} tokens per GPU "
                f"(benchmarks/distributed.py; scaling and peak ratio over the same method on one "
                f"GPU in the same run):", "",
                "| mode | GPUs | method | tokens/s | scaling | peak GiB/rank | peak ratio | "
                "ranks identical |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in sorted(rows, key=lambda x: (order.get(x["mode"], 9), x["method"])):
            if not ran(x):
                skipped.append((f"{x['mode']} {model}", x))
                continue
            num = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
            same = x.get("ranks_identical")
            out.append(f"| {x['mode']} | {x['gpus']} | {x['method']} | "
                       f"{num(x.get('tokens_per_s'), '{:.0f}')} | "
                       f"{num(x.get('scaling'), '{:.2f}x')} | {num(x.get('peak_gib'), '{:.1f}')} | "
                       f"{num(x.get('peak_ratio'), '{:.2f}')} | "
                       f"{'-' if same is None else ('yes' if same else 'NO')} |")
    return out


def meld_line(x: dict) -> str:
    """A meld record as a sentence: what was melded from where, its time and peak memory."""
    source = x.get("source", "memory")
    peak = "" if x.get("peak_gib") is None else f", peak {x['peak_gib']:.1f} GiB"
    if source == "synthetic":
        what = (f"falqon.meld_from_config of {x['model']} (seeded random weights made on the "
                f"GPU layer by layer)")
    elif source == "disk":
        bf16 = f"{x['bf16_gib']:.1f} GiB of bf16 weights, " if x.get("bf16_gib") else ""
        what = (f"falqon.meld_pretrained of {x['model']} from its safetensors files ({bf16}"
                f"page cache {x.get('page_cache', '?')})")
    else:
        what = f"falqon.meld of {x['model']}"
    return f"{what}: {x['seconds']:.1f} s{peak}."


def replace_between_markers(text: str, block: str) -> str | None:
    """`text` with its BEGIN ... END block replaced by `block`; None if the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[:start] + block + text[end + len(END):]


# ---- command line -------------------------------------------------------------------------------

def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--png", type=pathlib.Path, help="default: <results-dir>/speedup.png")
    p.add_argument("--readme", type=pathlib.Path, default=REPO / "README.md")
    p.add_argument("--snippet", type=pathlib.Path, default=REPO / "docs" / "results_snippet.md",
                   help="written instead when the README has no results markers")
    p.add_argument("--M", type=int, default=8192, help="tokens of the layer panel (default 8192)")
    p.add_argument("--r", type=int, default=64, help="rank of the layer panel (default 64)")
    args = p.parse_args(argv)
    png = args.png or args.results_dir / "speedup.png"
    records, devices = load_records(args.results_dir)
    wrote_png = plot(records, devices, png, args.M, args.r)
    print(f"wrote {png}" if wrote_png else "no measurement to plot: no PNG written")

    readme_text = args.readme.read_text() if args.readme.is_file() else ""
    target = args.readme if replace_between_markers(readme_text, "") is not None else args.snippet
    image = os.path.relpath(png, target.parent) if wrote_png else None
    block = markdown(records, devices, args.M, args.r, image)
    if target == args.readme:
        target.write_text(replace_between_markers(readme_text, block))
    else:
        print(f"{args.readme} has no {BEGIN} ... {END} markers: writing {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # The markers appear once only (in the block), so that the block can be pasted as is.
        target.write_text("The results block for README.md, which has no results markers yet: "
                          "paste the block below (markers included) into README.md; later runs "
                          "of `python benchmarks/plot_results.py` rewrite it there.\n\n"
                          + block + "\n")
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    main()
