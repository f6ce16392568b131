"""The ``dmm`` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from dmm.device import DEVICE_HELP

# `dmm --help` lists the commands in this order, in these panels: the pipeline's
# stages as they run, then what to do with a student, then studies.
COMMAND_PANELS: dict[str, tuple[str, ...]] = {
    "Pipeline stages (in order)": (
        "zoo", "teachers", "prompts", "sample", "plan", "distill", "baselines", "merge",
        "evaluate", "register",
    ),
    "Using a student": ("generate", "export", "import-dmm", "retire"),
    "Studies": ("ablate",),
    "Settings": ("config",),
}  # fmt: skip
COMMAND_ORDER = [name for names in COMMAND_PANELS.values() for name in names]


class PipelineOrderGroup(TyperGroup):
    """Lists subcommands in COMMAND_ORDER (unlisted ones last) rather than registration order."""

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda n: rank.get(n, len(rank)))


app = typer.Typer(
    cls=PipelineOrderGroup,
    help="Merge text-to-image models by distillation (DMM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="The embedded toy teacher zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

log = logging.getLogger("dmm")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def one_line_errors(fn):
    """Turn expected failures into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from dmm.atomic import DmmError

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            parts = [
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            ]
            typer.echo(f"error: invalid {exc.title} config: {'; '.join(parts)}", err=True)
        except (DmmError, ValueError, FileNotFoundError) as exc:
            typer.echo(
                f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True
            )
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        except Exception as exc:  # noqa: BLE001  (last resort: still one line, and a hint)
            if os.environ.get("DMM_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            typer.echo(
                f"error: {type(exc).__name__}: {first} (set DMM_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None
        raise typer.Exit(2)

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from dmm import __version__

        typer.echo(f"dmm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at DEBUG level (default: INFO).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _zoo_build_other_family(family: str, out: Path, miniature: bool) -> None:
    from dmm.atomic import DmmError

    if family != "sdxl":
        raise DmmError(f"unknown zoo family {family!r}: expected sd15 or sdxl")
    if not miniature:
        raise DmmError("the SDXL zoo exists only as --miniature (SDXL-shaped, untrained)")
    _quiet_libraries()
    from dmm.zoo.build import check_output_dir
    from dmm.zoo.sdxl import build_sdxl_miniature

    check_output_dir(out)
    manifest = build_sdxl_miniature(out)
    typer.echo(f"zoo (sdxl, miniature): {out.resolve()} in {manifest['build_seconds']} s")
    typer.echo(f"  teachers: {', '.join(manifest['teachers'])}")


@zoo_app.command("build")
@one_line_errors
def zoo_build(
    out: Annotated[Path, typer.Option(help="Where the zoo is written.")] = Path("data/zoo"),
    config: Annotated[
        Path | None, typer.Option(help="YAML file; its `zoo:` section is read if present.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the config's seed.")] = None,
    miniature: Annotated[bool, typer.Option(help="A seconds-long zoo for tests.")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date.")] = False,
    family: Annotated[
        str, typer.Option(help="sd15, or sdxl (with --miniature: an SDXL-shaped zoo for tests).")
    ] = "sd15",
) -> None:
    """Build the toy zoo (base + style teachers + style classifier), or reuse it."""
    if family != "sd15":
        _zoo_build_other_family(family, out, miniature)
        return
    import yaml

    from dmm.config import load_config
    from dmm.zoo.config import ZooConfig

    section = None
    if config is not None and config.exists():
        raw = yaml.safe_load(config.read_text()) or {}
        section = "zoo" if isinstance(raw, dict) and "zoo" in raw else None
    cfg = load_config(ZooConfig, config, section, seed=seed)
    if miniature:
        cfg = ZooConfig.miniature(**cfg.model_dump(exclude_defaults=True))
    _quiet_libraries()
    from dmm.zoo.build import build_zoo, check_output_dir

    check_output_dir(out)
    manifest = build_zoo(out, cfg, force=force)
    m = manifest["metrics"]
    typer.echo(f"zoo: {out.resolve()}")
    typer.echo(f"  teachers: {', '.join(manifest['teachers'])}")
    typer.echo(f"  style classifier held-out accuracy: {m['classifier_accuracy']:.3f}")
    cap = m["caption_following"]
    for split in ("train_captions", "held_out_captions"):
        b = cap[split]["base"]
        typer.echo(
            f"  base {split}: shape {b['shape']:.2f} colour {b['colour']:.2f} "
            f"position {b['position']:.2f} all {b['all']:.2f}"
        )
    typer.echo(
        f"  size: {manifest['total_bytes'] / 1e6:.1f} MB, built in {manifest['timings_s']['total']:.0f}s"
    )


def _yaml_section(config: Path | None, section: str) -> str | None:
    import yaml

    if config is None or not config.exists():
        return None
    raw = yaml.safe_load(config.read_text()) or {}
    return section if isinstance(raw, dict) and section in raw else None


@app.command("prompts")
@one_line_errors
def prompts_cmd(
    out: Annotated[Path, typer.Option(help="Output folder for train/eval JSONL.")] = Path(
        "data/prompts"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML file; its `prompts:` section if present.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help='"zoo", or a .txt / .jsonl prompt file.')
    ] = None,
    n_train: Annotated[
        int | None, typer.Option(help="Train prompts (default: the config's, else 512).")
    ] = None,
    n_eval: Annotated[
        int | None, typer.Option(help="Held-out eval prompts (default: the config's, else 64).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed of the prompt sets (default: the config's).")
    ] = None,
    zoo: Annotated[Path, typer.Option(help="The zoo, to check held-out combos.")] = Path(
        "data/zoo"
    ),
) -> None:
    """Build deduplicated train/eval prompt sets (JSONL) from the zoo grammar or a user file."""
    import json

    from dmm.config import load_stage_config
    from dmm.data.config import PromptsConfig
    from dmm.data.prompts import build_prompts

    sets = [
        f"{k}={v}"
        for k, v in (("n_train", n_train), ("n_eval", n_eval), ("seed", seed))
        if v is not None
    ]
    if source is not None:
        sets.append(f"source={json.dumps(source)}")
    cfg = load_stage_config(PromptsConfig, config, _yaml_section(config, "prompts"), sets)
    manifest = None
    if cfg.source == "zoo" and (zoo / "zoo.json").is_file():
        manifest = json.loads((zoo / "zoo.json").read_text())
    meta = build_prompts(cfg, out, manifest)
    counts = meta["counts"]
    typer.echo(f"prompts: {out} (train {counts['train']}, eval {counts['eval']})")


@app.command("sample")
@one_line_errors
def sample_cmd(
    out: Annotated[Path, typer.Option(help="Output root; one folder per teacher.")] = Path(
        "data/samples"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML file; its `sample:` section if present.")
    ] = None,
    zoo: Annotated[Path | None, typer.Option(help="Sample every teacher of this zoo.")] = None,
    teacher: Annotated[list[str] | None, typer.Option(help="NAME=DIR, repeatable.")] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            help="Base pipeline folder (default: ZOO/base, else data/teachers.yaml's base)."
        ),
    ] = None,
    prompts: Annotated[Path, typer.Option(help="Train prompts JSONL.")] = Path(
        "data/prompts/train.jsonl"
    ),
    only: Annotated[list[str] | None, typer.Option(help="Only these teachers.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override, e.g. --set steps=10")
    ] = None,
    device: Annotated[
        str,
        typer.Option(help=DEVICE_HELP),
    ] = "auto",
    summary: Annotated[
        bool, typer.Option(help="Also write OUT/samples.json over the teachers sampled.")
    ] = True,
) -> None:
    """Cache teacher-generated x0 latents and text embeddings for distillation."""
    from dmm.atomic import DmmError
    from dmm.config import load_stage_config
    from dmm.data.config import SampleConfig

    cfg = load_stage_config(SampleConfig, config, _yaml_section(config, "sample"), set_)
    _quiet_libraries()
    from dmm.data.samples import sample_all, teachers_from_zoo

    dirs: dict[str, Path] = dict(teachers_from_zoo(zoo)) if zoo else {}
    for item in teacher or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise DmmError(f"--teacher {item!r} is not NAME=DIR")
        dirs[name] = Path(path)
    if only:
        unknown = sorted(set(only) - set(dirs))
        if unknown:
            raise DmmError(
                f"unknown teachers in --only: {', '.join(unknown)}; known: {', '.join(dirs)}"
            )
        dirs = {k: v for k, v in dirs.items() if k in only}
    base_dir = base or (zoo / "base" if zoo else _manifest_base())
    if base_dir is None:
        raise DmmError("give --base (or --zoo), or run where data/teachers.yaml names the base")
    done = sample_all(dirs, base_dir, prompts, out, cfg, device=device, summary=summary)
    counts = ", ".join(f"{k}: {v['num_samples']}" for k, v in done.items())
    typer.echo(f"samples: {out} ({counts})")


def _manifest_base() -> Path | None:
    """The base that data/teachers.yaml names, resolved as the plan resolves it."""
    from dmm import layout

    if not Path(layout.MANIFEST).is_file():
        return None
    from dmm.plan import resolve_manifest_base

    return resolve_manifest_base(Path("."))


@app.command("generate")
@one_line_errors
def generate_cmd(
    prompt: Annotated[
        list[str] | None,
        typer.Argument(help="One or more prompts (with --grid, default: the preview prompts)."),
    ] = None,
    student: Annotated[
        Path,
        typer.Option(help="Student pipeline folder (default: the champion's working copy)."),
    ] = Path("data/champion"),
    style: Annotated[
        list[str] | None,
        typer.Option(
            help='A style name or index, or JSON weights like \'{"pastel": 0.3, "neon": 0.7}\'. Repeatable.'
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for PNGs.")] = Path("data/generated"),
    seed: Annotated[
        int, typer.Option(help="Seed of each prompt's first image; image k gets SEED+k.")
    ] = 0,
    num_images: Annotated[int, typer.Option(help="Images per prompt and style.")] = 1,
    steps: Annotated[int, typer.Option(help="Denoising steps per image.")] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 3.0,
    grid: Annotated[
        bool, typer.Option(help="One PNG: a row per style (all styles if none given).")
    ] = False,
    scale: Annotated[int, typer.Option(help="Upscale factor for the grid preview.")] = 3,
    region: Annotated[
        list[str] | None,
        typer.Option(help="X0,Y0,X1,Y1=STYLE: a box in pixels and its style. Repeatable."),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="WIDTHxHEIGHT of a --region image. Default: native.")
    ] = None,
) -> None:
    """Generate PNGs from a student with style=; --grid writes one row per style."""
    from dmm import layout
    from dmm.atomic import DmmError

    if not prompt and not grid:
        raise DmmError("give at least one prompt")
    _quiet_libraries()
    if region:
        from dmm.student.regional import generate_regional

        if style or grid:
            raise DmmError("--region sets the styles: do not combine it with --style or --grid")
        for path in generate_regional(
            student, list(prompt), list(region), out, size=size, seed=seed, steps=steps,
            guidance_scale=guidance_scale,
        ):  # fmt: skip
            typer.echo(str(path))
        return
    from dmm.student.generate import generate_images, parse_style

    result = generate_images(
        student,
        prompts=list(prompt or layout.PREVIEW_PROMPTS),
        styles=[parse_style(s) for s in style] if style else None,
        out_dir=out,
        seed=seed,
        num_images=num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        grid=grid,
        grid_scale=scale,
    )
    for path in result:
        typer.echo(str(path))


@app.command("evaluate")
@one_line_errors
def evaluate_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML config (its `evaluate:` section if present, e.g. params.yaml). "
            "Without it every key takes its default; `teachers` has none."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE over the config, repeatable, e.g. --set images_per_style=256; "
            "`dmm config show evaluate` lists the keys.",
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            help="Evaluate the plan's student with the plan's config (data/plan/evaluate.json); "
            "also writes data/evaluation/metrics.json."
        ),
    ] = False,
) -> None:
    """Run the FID_t protocol: student vs teachers vs static baselines; writes JSON + HTML report.

    Settings: --config's `evaluate:` section, then each --set KEY=VALUE on top
    (`dmm config show evaluate` lists every key, its type and default). Without
    --config every key takes its default, and `teachers` has none: give it with
    --set or a config, or use --plan. With a config that has `registry.gate`
    (params.yaml, or the plan's), the gate's verdict is printed too.

    Output goes to OUTPUT_DIR (default data/evaluation): evaluation.json,
    report.html and its figures.
    """
    import yaml

    from dmm import layout
    from dmm.config import load_stage_config
    from dmm.evaluation.config import EvaluateConfig
    from dmm.registry.gate import GateThresholds

    if plan:
        config = Path(layout.EVALUATE_PLAN)
        if not config.is_file():
            from dmm.atomic import DmmError

            raise DmmError(f"no {config}: run `dmm plan` first")
    cfg = load_stage_config(EvaluateConfig, config, _yaml_section(config, "evaluate"), set_)
    raw = yaml.safe_load(config.read_text()) if config is not None and config.exists() else None
    gate_cfg = ((raw or {}).get("registry") or {}).get("gate") if isinstance(raw, dict) else None
    thresholds = GateThresholds(**gate_cfg) if gate_cfg else None
    if plan:
        from dmm.plan import read_params, registry_config

        thresholds = registry_config(read_params(Path("."))).gate
    _quiet_libraries()
    from dmm.evaluation.protocol import evaluate

    r = evaluate(cfg, gate=thresholds)
    if plan:
        from dmm.workflow_cli import write_metrics

        write_metrics(Path("."), r, cfg.student)
    _print_evaluation(r)
    typer.echo(f"report: {Path(cfg.output_dir) / 'report.html'}")


def _print_evaluation(r: dict) -> None:
    iv = r.get("intervals") or {}

    def ci(key: str) -> str:
        return f" [{iv[key][0]:.3g}, {iv[key][1]:.3g}]" if iv.get(key) else ""

    conf = (r.get("uncertainty") or {}).get("confidence", 0.9)
    typer.echo(
        f"independent-seed ratio: {r['fid_t_independent_ratio']:.3f}{ci('fid_t_independent_ratio')}"
        f" ({conf:.0%} interval; 1.0 = the reference floor, lower is better)"
    )
    typer.echo(
        f"  shared-seed ratio: {r['fid_t_ratio']:.3f}{ci('fid_t_ratio')}  "
        f"FD_t ({r['feature_extractor']}): {r['fid_t']:.4g}  floor: {r['fid_t_ref']:.4g}"
    )
    for i, n in enumerate(r["styles"]):
        acc, ref = r["style_accuracy"][n], r["teacher_accuracy"][n]
        shown = "n/a" if acc is None else f"{acc:.2f} (teacher {ref:.2f})"
        floor = r["M_ref"][i]
        vs = r["M_diag_independent_seeds"][i] / floor if floor > 0 else float("inf")
        typer.echo(f"  {n:>12}: {vs:.2f}x its floor, style acc {shown}")
    for b, v in r["baselines"].items():
        typer.echo(
            f"  static merge {b}: shared-seed ratio {v['fid_t_ratio']:.4g}, "
            f"collapses to {v.get('collapses_to', 'n/a')}"
        )
    if r.get("gate"):
        verdict = "passed" if r["gate"]["passed"] else "FAILED"
        typer.echo(f"gate: {verdict} ({r['gate']['summary']})")


@app.command("ablate")
@one_line_errors
def ablate_cmd(
    config: Annotated[
        Path, typer.Option(help="YAML with `distill:` and `evaluate:` sections.")
    ] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Work folder for the three runs.")] = Path(
        "data/ablation"
    ),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="distill override, e.g. --set steps=200")
    ] = None,
) -> None:
    """Loss ablation (paper Table 1): score only, + feature, + adversarial, same budget."""
    from dmm.config import load_stage_config
    from dmm.distill.config import DistillConfig
    from dmm.evaluation.config import EvaluateConfig

    dcfg = load_stage_config(DistillConfig, config, "distill", set_)
    ecfg = load_stage_config(EvaluateConfig, config, "evaluate", None)
    _quiet_libraries()
    from dmm.evaluation.studies import ablation

    r = ablation(dcfg, ecfg, out)
    typer.echo(f"reference FD_t ({r['feature_extractor']}): {r['fid_t_ref']:.4g}")
    for name, row in r["rows"].items():
        typer.echo(
            f"  {name:<28} FD_t {row['fid_t']:.4g}  ratio {row['fid_t_ratio']:.3f}  style acc {row['mean_style_accuracy']}"
        )


@app.command("retire")
@one_line_errors
def retire_cmd(
    style: Annotated[list[str], typer.Option(help="Style to retire; repeatable.")],
    out: Annotated[Path, typer.Option(help="New student folder.")],
    student: Annotated[Path, typer.Option(help="Student pipeline folder.")] = Path(
        "data/student/student"
    ),
) -> None:
    """Drop styles from a student (no training; the other styles are unchanged)."""
    from dmm.student.edit import retire_styles

    typer.echo(f"student: {retire_styles(student, list(style), out)}")


@app.command("distill")
@one_line_errors
def distill_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML config (its `distill:` section if present, e.g. params.yaml). "
            "Without it every key takes its default; `base` and `teachers` have none."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE over the config, repeatable, e.g. --set steps=100 "
            "--set losses.feature=0; `dmm config show distill` lists the keys.",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help='"auto" (the newest checkpoint of this config, else start afresh), '
            '"latest" (the same, or an error) or a checkpoint directory.'
        ),
    ] = None,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Previous student: merge the config's teachers incrementally."),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            help="Run the merge plan (data/plan/, from `dmm plan`): its recipe, its parent, its "
            "MLflow run; under accelerate launch when DMM_ACCELERATE_ARGS is set."
        ),
    ] = False,
) -> None:
    """Distill every teacher into one style-promptable student (runs under accelerate launch too).

    Settings: --config's `distill:` section, then each --set KEY=VALUE on top
    (`dmm config show distill` lists every key, its type and default). Without
    --config every key takes its default, and `base` and `teachers` have none:
    give them with --set or a config, or use --plan.

    Output: the student pipeline in OUTPUT_DIR/student (default
    data/student/student), with checkpoints/ and metrics.jsonl in OUTPUT_DIR.
    """
    from dmm.config import load_stage_config

    if plan:
        if config or set_ or resume or from_:
            raise ValueError(
                "--plan takes its config from the plan; drop --config/--set/--resume/--from"
            )
        _quiet_libraries()
        from dmm.workflow_cli import run_distill_plan

        typer.echo(f"student: {run_distill_plan(Path('.'))}")
        return
    from dmm.distill.config import DistillConfig

    overrides = list(set_ or [])
    if resume is not None:
        overrides.append(f"resume={resume}")
    if from_ is not None:
        overrides.append(f"init_from={from_}")
    cfg = load_stage_config(DistillConfig, config, "distill", overrides)
    _quiet_libraries()
    from dmm.distill.trainer import distill

    final = distill(cfg)
    typer.echo(f"student: {final}")


from dmm.merge.cli import merge_command  # noqa: E402  (cheap: torch loads on use)

app.command("merge")(merge_command)
from dmm.teachers.cli import teachers_app  # noqa: E402

app.add_typer(teachers_app, name="teachers")
from dmm.student.cli import export_command  # noqa: E402

app.command("export")(export_command)
from dmm.student.official import import_dmm_command  # noqa: E402  (torch loads on use)

app.command("import-dmm")(import_dmm_command)
from dmm.workflow_cli import baselines_command, plan_command, register_command  # noqa: E402

app.command("plan")(one_line_errors(plan_command))
app.command("baselines")(one_line_errors(baselines_command))
app.command("register")(one_line_errors(register_command))
from dmm.config_cli import config_app, show_command  # noqa: E402

config_app.command("show")(one_line_errors(show_command))
app.add_typer(config_app, name="config")


def _set_panels() -> None:
    """Put every command in its COMMAND_PANELS panel of `dmm --help`."""
    panel_of = {name: panel for panel, names in COMMAND_PANELS.items() for name in names}
    for info in [*app.registered_commands, *app.registered_groups]:
        info.rich_help_panel = panel_of.get(info.name)


_set_panels()


if __name__ == "__main__":
    sys.exit(app())
