"""Distillation sweeps: named variants of params.yaml's `distill:` section, each
distilled and then scored with the FD_t protocol, several at a time.

One GPU holds many zoo-sized runs at once (they are bound by kernel launches,
not by the GPU), so `--jobs 8` there costs little more than one run. On a
2-core CPU use `--jobs 1`. Variants are YAML:

    defaults: {steps: 400}                # on top of params.yaml `distill:`
    variants:
      demo: {}
      mean_init: {init: teacher_mean}
      first3: {teachers: [pastel, neon, sepia], evaluate: false}
      inc4: {after: first3, init_from: first3, teachers: [blueprint], steps: 200}
      long: {steps: 2500, checkpoint_every: 250, convergence: true}

`teachers` names teachers of params.yaml; `init_from`/`after` name other
variants (a variant starts when the one it is `after` has finished);
`convergence: true` also scores every sealed checkpoint. With `--deadline S`,
distillations still running S seconds after the start are stopped and scored
from their last sealed checkpoint. Writes WORK/sweep.json (or --results) and
prints a table.

    python benchmarks/sweep.py benchmarks/sweeps/demo.yaml --work benchmarks/out/sweep --jobs 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmm.config import deep_merge  # noqa: E402

SWEEP_KEYS = {
    "after",
    "evaluate",
    "convergence",
    "teachers",
    "init_from",
    "samples_dir",
    "extra_evals",
}


def distill_config(params: dict, defaults: dict, spec: dict, work: Path, name: str) -> dict:
    base = {k: v for k, v in params["distill"].items() if k != "teachers"}
    cfg = deep_merge(
        deep_merge(base, defaults), {k: v for k, v in spec.items() if k not in SWEEP_KEYS}
    )
    by_name = {t["name"]: t for t in params["distill"]["teachers"]}
    names = spec.get("teachers") or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"variant {name!r}: unknown teachers {unknown}")
    cfg["teachers"] = [by_name[n] for n in names]
    if spec.get("samples_dir"):  # another sample cache, e.g. sampled with fewer steps
        cfg["teachers"] = [
            {**t, "samples": f"{spec['samples_dir']}/{t['name']}"} for t in cfg["teachers"]
        ]
    if spec.get("init_from"):
        cfg["init_from"] = str(work / spec["init_from"] / "student")
    cfg.update(output_dir=str(work / name), resume=None, progress=False)
    cfg.setdefault("checkpoints_total_limit", None)
    return cfg


def styles_of(run: Path) -> list[str]:
    return json.loads((run / "student" / "dmm_lineage.json").read_text())["styles"]


def checkpoint_student(run: Path, step: int, ckpt: Path, base: Path, names: list[str]) -> Path:
    """A student pipeline from a sealed checkpoint (the run may have been stopped)."""
    from safetensors.torch import load_file

    from dmm.distill.teachers import load_unet
    from dmm.student.model import StyleStudent

    student = StyleStudent.from_base(load_unet(base), names)
    student.load_state_dict(load_file(ckpt / "model.safetensors"))
    out = run / f"student-{step}"
    student.save_pipeline(out, base)
    return out


class Pool:
    """At most `jobs` subprocesses; callbacks run when one ends."""

    def __init__(self, jobs: int, env: dict):
        self.jobs, self.env, self.running, self.queue = jobs, env, [], []

    def submit(self, cmd: list[str], log: Path, done, kill_at: float | None = None) -> None:
        self.queue.append((cmd, log, done, kill_at))

    def loop(self) -> None:
        # Stopping the sweep stops its runs too: they are its children, not
        # daemons, and an orphaned distillation would hold the CPU/GPU for hours.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            self._loop()
        finally:
            for proc, fh, *_ in self.running:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
                fh.close()

    def _loop(self) -> None:
        while self.queue or self.running:
            while self.queue and len(self.running) < self.jobs:
                cmd, log, done, kill_at = self.queue.pop(0)
                fh = open(log, "w")
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
                self.running.append((proc, fh, done, kill_at, time.time()))
            for item in list(self.running):
                proc, fh, done, kill_at, t0 = item
                if kill_at is not None and time.time() > kill_at and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
                if proc.poll() is not None:
                    fh.close()
                    self.running.remove(item)
                    done(proc.returncode, time.time() - t0)
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", type=Path)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/sweep")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=None, help="seconds; stop distilling then")
    ap.add_argument(
        "--only",
        nargs="*",
        help="run only these variants (and what they need that WORK does not hold yet)",
    )
    ap.add_argument("--eval-set", action="append", default=[], help="evaluate override k=v")
    ap.add_argument(
        "--results", type=Path, help="where to write the results (default WORK/sweep.json)"
    )
    args = ap.parse_args()
    t_start = time.time()
    kill_at = t_start + args.deadline if args.deadline else None

    params = yaml.safe_load(args.params.read_text())
    doc = yaml.safe_load(args.variants.read_text())
    defaults, variants = doc.get("defaults") or {}, doc["variants"]
    # Sweep keys (samples_dir, convergence, ...) may be defaults too.
    shared = {k: v for k, v in defaults.items() if k in SWEEP_KEYS}
    defaults = {k: v for k, v in defaults.items() if k not in SWEEP_KEYS}
    variants = {n: {**shared, **(v or {})} for n, v in variants.items()}
    if args.only:
        keep, todo = set(), list(args.only)
        while todo:
            n = todo.pop()
            keep.add(n)
            todo += [d for d in (variants[n].get("after"), variants[n].get("init_from")) if d]
        # A dependency that already has a student in WORK is reused, not rerun.
        done = {n for n in keep - set(args.only) if (args.work / n / "student").is_dir()}
        variants = {
            k: ({**v, "after": None} if v.get("after") in done else v)
            for k, v in variants.items()
            if k in keep - done
        }
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Concurrent runs that each spin up one thread per core fight for the
    # cores (on 2 cores two runs went 4x slower each); split them instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    dmm = [sys.executable, "-m", "dmm.cli"]
    pool = Pool(args.jobs, env)
    results: dict[str, dict] = {n: {"spec": v} for n, v in variants.items()}
    base = Path(params["distill"]["base"])

    def save() -> None:
        (args.results or work / "sweep.json").write_text(json.dumps(results, indent=2, default=str))

    def evaluate(name: str, label: str, student: Path, styles: list[str], extra=None) -> None:
        ev = dict(params["evaluate"], **(extra or {}))
        ev_teachers = {t["name"]: t for t in ev["teachers"]}
        ev.update(
            student=str(student), baselines={}, convergence=False, interpolate=None,
            output_dir=str(work / name / f"eval-{label}"), distill_dir=str(work / name),
            teachers=[ev_teachers[s] for s in styles],
        )  # fmt: skip
        cfg_file = work / name / f"eval-{label}.yaml"
        cfg_file.write_text(yaml.safe_dump({"evaluate": ev}))
        sets = [x for kv in args.eval_set for x in ("--set", kv)]

        def done(rc: int, seconds: float) -> None:
            out = work / name / f"eval-{label}" / "evaluation.json"
            if rc != 0 or not out.is_file():
                results[name].setdefault("errors", []).append(f"evaluate {label}: rc {rc}")
            else:
                r = json.loads(out.read_text())
                M, ref = r["M"], r["M_ref"]
                acc, tacc = r["style_accuracy"], r["teacher_accuracy"]
                results[name].setdefault("scores", {})[label] = {
                    "fid_t_ratio": r["fid_t_ratio"],
                    "fid_t_independent_ratio": r.get("fid_t_independent_ratio"),
                    "fid_t": r["fid_t"],
                    "fid_t_ref": r["fid_t_ref"],
                    "diag": {s: M[i][i] for i, s in enumerate(r["styles"])},
                    "ref": {s: ref[i] for i, s in enumerate(r["styles"])},
                    "min_relative_style_accuracy": min(
                        (acc[s] or 0) / max(tacc[s] or 1e-9, 1e-9) for s in r["styles"]
                    ),
                    "eval_seconds": round(seconds, 1),
                }
            save()

        pool.submit(
            [*dmm, "evaluate", "--config", str(cfg_file), *sets],
            work / name / f"eval-{label}.log",
            done,
        )

    def finished(name: str, rc: int, seconds: float) -> None:
        spec, run = variants[name], work / name
        results[name].update(distill_rc=rc, distill_seconds=round(seconds, 1))
        summary = run / "summary.json"
        if summary.is_file():
            info = json.loads(summary.read_text())
            results[name].update(train_seconds=info["seconds"], steps_done=info["steps"])
        if (run / "student" / "dmm_lineage.json").is_file():
            styles = styles_of(run)
            if spec.get("evaluate", True):
                evaluate(name, "final", run / "student", styles)
            for label, extra in (spec.get("extra_evals") or {}).items():
                evaluate(name, label, run / "student", styles, extra)
            for other, ospec in variants.items():
                if ospec.get("after") == name:
                    start(other)
        else:
            results[name].setdefault("errors", []).append(f"distill rc {rc}: no student")
            styles = spec.get("teachers") or [t["name"] for t in params["distill"]["teachers"]]
        if spec.get("convergence") and spec.get("init_from") is None:
            from dmm.distill import checkpoints as ckpt

            # With EMA the student is the averaged weights; the last checkpoint
            # holds the raw ones, so it is scored too (a paired comparison).
            ema = configs[name].get("ema")
            for step, directory in ckpt.list_checkpoints(run / "checkpoints"):
                final = (run / "student").is_dir() and step == results[name].get("steps_done")
                if final and not ema:
                    continue
                evaluate(
                    name,
                    f"step{step}",
                    checkpoint_student(run, step, directory, base, styles),
                    styles,
                )
        save()

    configs: dict[str, dict] = {}

    def start(name: str) -> None:
        cfg = configs[name] = distill_config(params, defaults, variants[name], work, name)
        (work / name).mkdir(parents=True, exist_ok=True)
        cfg_file = work / name / "distill.yaml"
        cfg_file.write_text(yaml.safe_dump({"distill": cfg}))
        pool.submit(
            [*dmm, "distill", "--config", str(cfg_file)],
            work / name / "distill.log",
            lambda rc, s, name=name: finished(name, rc, s),
            kill_at,
        )

    # Teacher images first, into the evaluation cache, so the evaluations that
    # follow (often several at once) all read them instead of each sampling them.
    warm = (
        "import sys, yaml; from dmm.evaluation.config import EvaluateConfig;"
        "from dmm.evaluation import protocol as p;"
        "c = EvaluateConfig(**yaml.safe_load(open(sys.argv[1]))['evaluate']);"
        "p.teacher_image_sets(c, *p.eval_inputs(c), c.torch_device())"
    )
    warm_cfg = work / "warm-cache.yaml"
    ev = dict(params["evaluate"], student=str(base), baselines={})
    sets = {kv.split("=", 1)[0]: yaml.safe_load(kv.split("=", 1)[1]) for kv in args.eval_set}
    warm_cfg.write_text(yaml.safe_dump({"evaluate": {**ev, **sets}}))
    pool.submit(
        [sys.executable, "-c", warm, str(warm_cfg)],
        work / "warm-cache.log",
        lambda rc, s: results.setdefault("_warm_cache", {"rc": rc, "seconds": round(s, 1)}),
    )
    for name, spec in variants.items():
        if not spec.get("after"):
            start(name)
    pool.loop()
    results["_meta"] = {"seconds": round(time.time() - t_start, 1), "jobs": args.jobs}
    save()
    print(f"{'variant':<24} {'label':<10} {'ratio':>7} {'acc':>5}  per-style FD (ref)")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        for label, s in (r.get("scores") or {}).items():
            per = " ".join(f"{k}={v:.2f}" for k, v in s["diag"].items())
            print(
                f"{name:<24} {label:<10} {s['fid_t_ratio']:7.3f} "
                f"{s['min_relative_style_accuracy']:5.2f}  {per}"
            )
        for err in r.get("errors", []):
            print(f"{name:<24} ERROR {err}")


if __name__ == "__main__":
    main()
