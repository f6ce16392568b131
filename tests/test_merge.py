"""Static merging baselines: hand-computed methods, streaming, pipelines, CLI, sd-mecha."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import dmm
from dmm.atomic import DmmError
from dmm.merge import methods as M
from dmm.merge.blocks import block_strengths, detect_layout
from dmm.merge.cli import merge_app, merge_command
from dmm.merge.config import METHOD_NAMES, METHOD_PARAMS, MergeConfig
from dmm.merge.stream import (
    UNET_WEIGHTS,
    MergeError,
    SafetensorsWriter,
    TensorSpec,
    merge_files,
    merge_unets,
    read_merge_metadata,
)

# --- hand-computed tiny tensors --------------------------------------------
# Dyadic values, so that most expected results are exact in float32.
BASE = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0])
TAU = [
    torch.tensor([0.5, -0.125, 0.375, 0.0, -0.25]),
    torch.tensor([-0.25, 0.75, -0.125, 0.625, 0.125]),
    torch.tensor([0.125, -0.375, -0.875, 0.25, 0.0625]),
]
TEACHERS = [BASE + t for t in TAU]


def merge(method: str, teachers=TEACHERS, base=BASE, key: str = "w", **params) -> torch.Tensor:
    return M.merge_tensor(method, key, base, list(teachers), **params)


def test_weighted_normalises_weights_and_defaults_to_uniform():
    # 0.25 * [1.5, -1.125, 0.875, 0, 1.75] + 0.75 * [0.75, -0.25, 0.375, 0.625, 2.125]
    out = merge("weighted", TEACHERS[:2], weights=[1, 3])
    assert torch.equal(out, torch.tensor([0.9375, -0.46875, 0.5, 0.46875, 2.03125]))
    # uniform: base + mean tau = base + [0.375, 0.25, -0.625, 0.875, -0.0625] / 3
    expected = BASE + torch.tensor([0.375, 0.25, -0.625, 0.875, -0.0625]) / 3
    torch.testing.assert_close(merge("weighted"), expected)


def test_task_arithmetic():
    # base + 0.6 * mean tau = base + [0.075, 0.05, -0.125, 0.175, -0.0125]
    out = merge("task_arithmetic", lam=0.6)
    torch.testing.assert_close(out, torch.tensor([1.075, -0.95, 0.375, 0.175, 1.9875]))
    # weights are relative: [2, 2, 2] is uniform; lam = N gives the plain sum of taus
    torch.testing.assert_close(
        merge("task_arithmetic", weights=[2, 2, 2], lam=3.0), BASE + sum(TAU)
    )


def test_ties_default_trims_to_top_20_percent():
    # k = 0.2 of 5 entries keeps 1 per teacher: tau1 -> idx0 0.5, tau2 -> idx1 0.75,
    # tau3 -> idx2 -0.875. No entry has two survivors, so tau_m is their sum.
    assert torch.equal(merge("ties"), BASE + torch.tensor([0.5, 0.75, -0.875, 0.0, 0.0]))


def test_ties_hand_computed_k_04():
    # k = 0.4 keeps 2 of 5 per teacher:
    #   tau1' = [0.5, 0, 0.375, 0, 0]       (|0.5|, |0.375| largest)
    #   tau2' = [0, 0.75, 0, 0.625, 0]
    #   tau3' = [0, -0.375, -0.875, 0, 0]
    # sum   = [0.5, 0.375, -0.5, 0.625, 0] -> elected signs [+, +, -, +, none]
    # idx1: only tau2' (+0.75) agrees; idx2: only tau3' (-0.875) agrees.
    out = merge("ties", k=0.4)
    assert torch.equal(out, BASE + torch.tensor([0.5, 0.75, -0.875, 0.625, 0.0]))


def test_ties_elects_by_mass_not_by_count():
    # k = 1 (no trim), lam = 0.5. Summed taus: [0.375, 0.25, -0.625, 0.875, -0.0625].
    # idx1: signs (-, +, -) would win "-" by count, but the mass is +0.25: only
    #       tau2 = 0.75 agrees. idx4: (-, +, +) by count "+", by mass "-": -0.25.
    # idx0: mean(0.5, 0.125) = 0.3125; idx2: mean(-0.125, -0.875) = -0.5;
    # idx3: mean(0.625, 0.25) = 0.4375 (tau1's 0 does not count).
    out = merge("ties", k=1.0, lam=0.5)
    tau_m = torch.tensor([0.3125, 0.75, -0.5, 0.4375, -0.25])
    assert torch.equal(out, BASE + 0.5 * tau_m)


def test_ties_weighted_disjoint_mean_and_zero_mass():
    # weights [1, 1, 2]: sum w tau = [0.5, -0.125, -1.5, 1.125, 0.0]
    # idx0: (1*0.5 + 2*0.125) / 3 = 0.25;  idx1: (1*-0.125 + 2*-0.375) / 3
    # idx2: (1*-0.125 + 2*-0.875) / 3;     idx3: (1*0.625 + 2*0.25) / 3 = 0.375
    # idx4: -0.25 + 0.125 + 2*0.0625 = 0 exactly: no elected sign, zero delta.
    out = merge("ties", k=1.0, weights=[1, 1, 2])
    tau_m = torch.tensor([0.25, -0.875 / 3, -1.875 / 3, 0.375, 0.0])
    torch.testing.assert_close(out, BASE + tau_m)
    assert out[4] == BASE[4]


def test_keep_count_and_trim_ties():
    assert [M.keep_count(n, 0.2) for n in (1, 4, 5, 6, 10, 11)] == [1, 1, 1, 2, 2, 3]
    assert M.keep_count(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert M.keep_count(7, 1.0) == 7
    # entries tied with the threshold are all kept
    t = torch.tensor([0.1, -0.5, 0.5, 0.2, 0.0])
    assert torch.equal(M.magnitude_trim(t, 0.2), torch.tensor([0.0, -0.5, 0.5, 0.0, 0.0]))


def _masks(seed: int, key: str, shape, n: int, p: float) -> list[torch.Tensor]:
    """DARE masks drawn independently of dmm's code, from the documented scheme."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return [torch.rand(shape, generator=g) >= p for _ in range(n)]


def test_dare_linear_hand_computed():
    p, lam, key, seed = 0.5, 0.8, "blocks.0.w", 7
    masks = _masks(seed, key, BASE.shape, 3, p)
    expected = BASE + lam * sum(m * t * 2.0 for m, t in zip(masks, TAU, strict=True)) / 3
    out = merge("dare_linear", key=key, p=p, lam=lam, seed=seed)
    torch.testing.assert_close(out, expected)


def test_dare_ties_is_dare_then_ties():
    p, key, seed = 0.5, "blocks.1.w", 3
    masks = _masks(seed, key, BASE.shape, 3, p)
    dropped = [BASE + m * t * 2.0 for m, t in zip(masks, TAU, strict=True)]
    for k in (1.0, 0.4):
        expected = M.merge_tensor("ties", key, BASE, dropped, k=k)
        out = merge("dare_ties", key=key, p=p, k=k, seed=seed)
        torch.testing.assert_close(out, expected)
    # p = 0 drops nothing: plain TIES with the same k
    assert torch.equal(merge("dare_ties", p=0.0, k=0.4), merge("ties", k=0.4))


def test_dare_rescale_is_exact_and_drop_fraction_is_p():
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    out = M.random_drop(tau, 0.75, M.key_generator(0, "x"))
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] * 4.0)  # 1 / (1 - 0.75) = 4 exactly
    out = M.random_drop(tau, 0.9, M.key_generator(0, "x"))
    kept = out != 0
    assert abs((~kept).float().mean().item() - 0.9) < 0.005  # 5 sigma
    torch.testing.assert_close(out[kept], tau[kept] / 0.1, rtol=1e-6, atol=0)


def test_dare_seed_determinism_and_order_independence():
    big = [BASE.repeat(200) + 0.1 * torch.randn(1000) for _ in range(2)]
    base = BASE.repeat(200)

    def run(key, seed):
        return merge("dare_linear", big, base, key=key, seed=seed)

    a1, b1 = run("a", 1), run("b", 1)
    b2, a2 = run("b", 1), run("a", 1)  # other order, same results
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(run("a", 2), a1)
    assert not torch.equal((a1 == base), (b1 == base))  # keys get their own masks
    assert M.key_seed(5, "k") == int.from_bytes(hashlib.sha256(b"5:k").digest()[:8], "little") & (
        2**63 - 1
    )


def test_dtypes_non_float_and_bad_inputs():
    half = [t.half() for t in TEACHERS]
    out = merge("ties", half, BASE.half(), k=0.4)
    assert out.dtype == torch.float16
    expected = M.merge_tensor("ties", "w", BASE.half().float(), [t.float() for t in half], k=0.4)
    assert torch.equal(out, expected.half())
    assert merge("weighted", [t.bfloat16() for t in TEACHERS], BASE.bfloat16()).dtype == (
        torch.bfloat16
    )
    ids = torch.arange(5)
    assert torch.equal(merge("ties", [ids + 1, ids * 2], ids), ids)  # non-float: base copy
    with pytest.raises(ValueError, match="shape mismatch for key 'w'"):
        merge("weighted", [TEACHERS[0], torch.zeros(4)])
    with pytest.raises(ValueError, match="unknown merge method"):
        merge("slerp")
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        merge("weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        merge("ties", weights=[1, -1, 1])
    with pytest.raises(ValueError, match="does not take"):
        merge("weighted", k=0.5)


def test_config_ranges_and_defaults_match_methods():
    c = MergeConfig(method="ties")
    assert (c.k, c.p, c.lam, c.seed, c.weights) == (
        M.DEFAULT_K,
        M.DEFAULT_P,
        M.DEFAULT_LAM,
        M.DEFAULT_SEED,
        None,
    )
    assert c.k == 0.2
    assert set(METHOD_NAMES) == set(M.METHODS)
    for name, m in M.METHODS.items():
        assert METHOD_PARAMS[name] == m.params
    assert c.params(2) == {"weights": [0.5, 0.5], "lam": 1.0, "k": 0.2}
    for bad in [
        dict(k=0.0),
        dict(k=1.5),
        dict(p=1.0),
        dict(p=-0.1),
        dict(seed=-1),
        dict(weights=[1, -1]),
        dict(weights=[0, 0]),
        dict(weights=[]),
        dict(lam=math.inf),
        dict(alpha=0.5),
    ]:
        with pytest.raises(ValidationError):
            MergeConfig(method="dare_ties", **bad)
    with pytest.raises(ValidationError):
        MergeConfig(method="slerp")


# --- streaming files ----------------------------------------------------------


def _model(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        return {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in base.items()
        }
    return {
        "a.weight": torch.randn(16, 8, generator=g).half(),
        "a.bias": torch.randn(16, generator=g),
        "b.weight": torch.randn(3, 3, 4, generator=g).bfloat16(),
        "c.scale": torch.randn((), generator=g, dtype=torch.float64),
        "pos_ids": torch.arange(7).unsqueeze(0),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture()
def files(tmp_path) -> tuple[Path, list[Path]]:
    base = _model(0)
    save_file(base, tmp_path / "base.safetensors")
    teachers = []
    for i in range(3):
        p = tmp_path / f"teacher{i}.safetensors"
        save_file(_model(i + 1, base), p)
        teachers.append(p)
    return tmp_path / "base.safetensors", teachers


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_streaming_equals_in_memory_merge(files, tmp_path, method):
    base, teachers = files
    out = tmp_path / "out" / "merged.safetensors"
    params = {"weights": [1, 2, 1]} if method in ("weighted", "task_arithmetic") else {}
    summary = merge_files(base, teachers, out, method, **params)
    got = load_file(out)
    b, ts = load_file(base), [load_file(t) for t in teachers]
    full = MergeConfig(method=method, **params).params(3)
    assert got.keys() == b.keys()
    for key in b:
        want = M.merge_tensor(method, key, b[key], [t[key] for t in ts], **full)
        assert got[key].dtype == b[key].dtype and torch.equal(got[key], want), key
    assert torch.equal(got["pos_ids"], b["pos_ids"]) and torch.equal(got["mask"], b["mask"])
    assert summary["keys"] == 7 and summary["merged"] == 5 and summary["copied"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["merged.safetensors"]  # no temp files


def test_output_header_is_aligned_and_records_everything(files, tmp_path):
    base, teachers = files
    out = tmp_path / "m.safetensors"
    merge_files(base, teachers, out, "dare_ties", seed=11)
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "BOOL": 1}
    for key, h in header.items():
        if key != "__metadata__":
            assert h["data_offsets"][0] % sizes[h["dtype"]] == 0, key
    assert header["__metadata__"]["format"] == "pt"
    rec = read_merge_metadata(out)
    assert rec["method"] == "dare_ties" and rec["seed"] == 11
    assert rec["params"] == {
        "weights": [1 / 3] * 3,
        "lam": 1.0,
        "p": 0.9,
        "k": 0.2,
        "seed": 11,
    }
    assert rec["weights"] == [1 / 3] * 3 and "sha256" in rec["rng"]
    assert rec["base"] == {
        "name": "base.safetensors",
        "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
    }
    assert [t["name"] for t in rec["teachers"]] == [t.name for t in teachers]
    assert rec["teachers"][2]["sha256"] == hashlib.sha256(teachers[2].read_bytes()).hexdigest()
    assert rec["version"] == dmm.__version__ and rec["torch"] == torch.__version__
    # deterministic methods record no seed; every default is recorded
    merge_files(base, teachers, out, "ties")
    rec = read_merge_metadata(out)
    assert rec["seed"] is None and rec["params"] == {"weights": [1 / 3] * 3, "lam": 1.0, "k": 0.2}
    # same seed, same bytes (the recorded metadata is part of them)
    merge_files(base, teachers, tmp_path / "a.safetensors", "dare_linear", seed=4)
    merge_files(base, teachers, tmp_path / "b.safetensors", "dare_linear", seed=4)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_only_prefix_copies_other_keys(files, tmp_path):
    base, teachers = files
    out = tmp_path / "m.safetensors"
    s = merge_files(base, teachers, out, "weighted", only_prefix="a.")
    got, b = load_file(out), load_file(base)
    assert s["merged"] == 2
    assert not torch.equal(got["a.weight"], b["a.weight"])
    assert torch.equal(got["b.weight"], b["b.weight"]) and torch.equal(got["c.scale"], b["c.scale"])
    assert read_merge_metadata(out)["only_prefix"] == "a."


def test_writer_accepts_out_of_order_writes(tmp_path):
    specs = {"x": TensorSpec("F32", (3,)), "y": TensorSpec("I64", (2,)), "z": TensorSpec("F16", ())}
    values = {"x": torch.ones(3), "y": torch.tensor([5, 6]), "z": torch.tensor(2.0).half()}
    with open(tmp_path / "w.safetensors", "wb") as fh:
        w = SafetensorsWriter(fh, specs, {"k": "v"})
        for key in ["z", "x", "y"]:
            w.write(key, values[key])
        assert w.missing() == []
    got = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], values[k]) for k in values)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_bad_inputs_are_one_line_errors_and_leave_nothing(files, tmp_path):
    base, teachers = files
    out = tmp_path / "out" / "m.safetensors"
    before = _listing(tmp_path)

    def fails(match: str, bad_teachers: list[Path], **kw) -> None:
        with pytest.raises(MergeError, match=match) as info:
            merge_files(kw.pop("base", base), bad_teachers, kw.pop("out", out), "ties", **kw)
        assert isinstance(info.value, DmmError) and isinstance(info.value, ValueError)
        assert "\n" not in str(info.value)

    t = load_file(teachers[0])
    del t["a.bias"]
    save_file(t, tmp_path / "missing_key.safetensors")
    fails(
        "key 'a.bias' is missing in teacher .*missing_key", [tmp_path / "missing_key.safetensors"]
    )
    t = load_file(teachers[0])
    t["a.weight"] = torch.zeros(8, 16).half()
    save_file(t, tmp_path / "shape.safetensors")
    fails(r"shape mismatch for key 'a.weight': base \(16, 8\)", [tmp_path / "shape.safetensors"])
    fails("file not found: .*nope", [tmp_path / "nope.safetensors"])
    data = teachers[1].read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 10])
    fails("trunc.safetensors is not a readable safetensors file", [tmp_path / "trunc.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    fails("not a readable safetensors file", [tmp_path / "junk.safetensors"])
    fails("overlaps input", teachers, out=teachers[0])
    fails("is a folder", teachers, out=tmp_path)
    fails("at least one teacher", [])
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        merge_files(base, teachers, out, "weighted", weights=[1, 2])
    made = {"missing_key.safetensors", "shape.safetensors", "trunc.safetensors", "junk.safetensors"}
    assert set(_listing(tmp_path)) == set(before) | made  # no output, no "out" dir content
    assert not out.exists()


def test_crash_mid_merge_leaves_previous_output(files, tmp_path, monkeypatch):
    base, teachers = files
    out = tmp_path / "m.safetensors"
    merge_files(base, teachers, out, "weighted")
    old = out.read_bytes()
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return M.merge_tensor(*a, **k)

    monkeypatch.setattr(M, "merge_tensor", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_files(base, teachers, out, "ties")
    assert out.read_bytes() == old
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- diffusers pipelines -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A zoo-shaped folder (base + teachers/<style>) of untrained tiny pipelines.

    Built in a second or two instead of training the miniature zoo: merging only
    needs the layout and the weights, and generation only needs them to load.
    One teacher also changes its text encoder, which the merge must not take.
    """
    from dmm.zoo.build import make_pipeline, vocabulary
    from dmm.zoo.models import MAX_TOKENS, make_autoencoder, make_text_encoder, make_unet
    from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer

    root = tmp_path_factory.mktemp("tiny") / "zoo"
    tok = build_tokenizer(vocabulary(), root.parent / "tok", MAX_TOKENS)
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    unet, te = make_unet(8), make_text_encoder(len(vocab), vocab[BOS], vocab[EOS])
    vae = make_autoencoder()
    make_pipeline(unet, te, tok, vae).save_pretrained(root / "base")
    teachers = []
    for i, style in enumerate(["ink", "neon"]):
        t_unet = make_unet(8)
        t_unet.load_state_dict(unet.state_dict())
        with torch.no_grad():
            for prm in t_unet.parameters():
                prm.add_(0.01 * torch.randn_like(prm))
        t_te = make_text_encoder(len(vocab), vocab[BOS], vocab[EOS]) if i == 1 else te
        make_pipeline(t_unet, t_te, tok, vae).save_pretrained(root / "teachers" / style)
        teachers.append(root / "teachers" / style)
    return root, teachers


def test_merge_unets_builds_a_loadable_pipeline(tiny_zoo, tmp_path):
    from diffusers import StableDiffusionPipeline

    zoo, teachers = tiny_zoo
    out = tmp_path / "merged"
    summary = merge_unets(zoo / "base", teachers, out, "ties")
    assert summary["merged"] > 0 and summary["out"] == str(out)
    assert _listing(tmp_path) == ["merged"]  # no temp dir left next to it
    for sub in ["text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]:
        assert (out / sub).read_bytes() == (zoo / "base" / sub).read_bytes(), sub
    assert _listing(out / "unet") == ["config.json", "diffusion_pytorch_model.safetensors"]
    rec = json.loads((out / "merge.json").read_text())
    assert rec == read_merge_metadata(out / UNET_WEIGHTS)
    assert rec["base"]["name"] == "base/unet/diffusion_pytorch_model.safetensors"
    assert len(rec["teachers"]) == len(teachers) and rec["params"]["k"] == 0.2

    merged = load_file(out / UNET_WEIGHTS)
    b = load_file(zoo / "base" / UNET_WEIGHTS)
    ts = [load_file(t / UNET_WEIGHTS) for t in teachers]
    key = sorted(b)[0]
    assert torch.equal(merged[key], M.merge_tensor("ties", key, b[key], [t[key] for t in ts]))

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a small red circle in the center",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert img.shape[0] == 1 and img.shape[-1] == 3 and float(img.std()) > 0


def test_merge_unets_bad_inputs_leave_nothing(tiny_zoo, tmp_path):
    zoo, teachers = tiny_zoo
    good = teachers[0]
    out = tmp_path / "merged"
    no_unet = tmp_path / "no_unet"
    shutil.copytree(good, no_unet, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    with pytest.raises(MergeError, match=r"no_unet/unet/diffusion_pytorch_model\.safetensors not"):
        merge_unets(zoo / "base", [good, no_unet], out, "weighted")
    with pytest.raises(MergeError, match="pipeline folder not found"):
        merge_unets(zoo / "base", [tmp_path / "ghost"], out, "weighted")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    w = broken / UNET_WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(DmmError, match="not a readable safetensors file") as info:
        merge_unets(zoo / "base", [good, broken], out, "weighted")
    assert "\n" not in str(info.value)
    with pytest.raises(MergeError, match="overlaps input"):
        merge_unets(zoo / "base", [good], zoo / "base" / "merged", "weighted")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MergeError, match="is a file"):
        merge_unets(zoo / "base", [good], tmp_path / "a_file", "weighted")
    (tmp_path / "a_file").unlink()
    assert _listing(tmp_path) == ["broken", "no_unet"]
    assert not (zoo / "base" / "merged").exists()


# --- CLI --------------------------------------------------------------------


def _cli(args: list[str]):
    return CliRunner().invoke(merge_app, [str(a) for a in args])


def test_cli_merges_files_and_zoo(files, tiny_zoo, tmp_path):
    base, teachers = files
    out = tmp_path / "cli.safetensors"
    args = ["--method", "task_arithmetic", "--base", base, "--out", out, "--weights", "1,2,1"]
    r = _cli([*args, *sum((["--teacher", t] for t in teachers), []), "--lam", "0.5"])
    assert r.exit_code == 0, r.output
    assert "merged 5 tensors" in r.stdout
    rec = read_merge_metadata(out)
    assert rec["params"] == {"weights": [0.25, 0.5, 0.25], "lam": 0.5}

    zoo, teachers = tiny_zoo
    r = _cli(["--method", "dare_linear", "--zoo", zoo, "--out", tmp_path / "z", "--seed", "3"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "z" / "merge.json").read_text())
    assert rec["seed"] == 3
    assert [t["name"].split("/")[0] for t in rec["teachers"]] == ["ink", "neon"]


def test_cli_registers_with_one_line_and_imports_no_torch():
    import subprocess
    import sys

    import typer

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("merge")(merge_command)  # the line dmm/cli.py adds
    r = CliRunner().invoke(app, ["merge", "--help"])
    assert r.exit_code == 0 and "--method" in r.output and "--zoo" in r.output
    code = "import sys, dmm.merge.cli; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "weighted", "--k", "0.5"], "--k is not used by --method weighted"),
        (["--method", "ties", "--k", "0"], "invalid merge config: k:"),
        (["--method", "ties", "--weights", "1,x"], "comma-separated numbers"),
        (["--method", "ties", "--teacher", "nope.safetensors"], "file not found"),
        (["--method", "ties", "--zoo", "."], "either --zoo or --base"),
    ],
)
def test_cli_errors_are_one_line_exit_2(files, tmp_path, extra, message):
    base, teachers = files
    out = tmp_path / "o.safetensors"
    has_teacher = "--teacher" in extra
    args = ["--base", base, "--out", out, *([] if has_teacher else ["--teacher", teachers[0]])]
    r = _cli([*args, *extra])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


# --- sd-mecha cross-check ----------------------------------------------------

try:
    import sd_mecha  # noqa: F401

    HAVE_MECHA = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_MECHA = False

_skip_mecha = pytest.mark.skipif(
    not HAVE_MECHA, reason="sd-mecha not importable (pip install sd-mecha==1.1.8)"
)


def needs_mecha(fn):
    # A timeout turns a stall inside sd-mecha into a failure with a traceback.
    return _skip_mecha(pytest.mark.timeout(120)(fn))


UNET = "model.diffusion_model."
# Cheap to merge by both engines, so the module does not need the fast options.
FAST = dict(omit_non_finite_inputs=False, check_finite_output=False, validate_mm_contract=False)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """SD1.5 single files in the LDM key layout, holding a subset of the keys.

    sd-mecha detects "sd1-ldm" from a subset (missing keys are only fatal with
    strict_mandatory_keys=True), so 60 UNet tensors (0.4M of its 860M parameters), a few
    text-encoder and VAE tensors and the int64 position_ids are enough: 4 files of
    ~1 MB in fp16. Weights are random and small, teachers = base + noise.
    """
    import yaml

    cfg_path = Path(sd_mecha.__file__).parent / "extensions/builtin/model_configs/sd1-ldm.yaml"
    comps = yaml.safe_load(cfg_path.read_text())["components"]
    shapes: dict[str, list[int]] = {}
    used = 0
    for key, meta in sorted(comps["diffuser"].items()):
        n = math.prod(meta["shape"])
        if n <= 120_000 and used + n <= 400_000 and len(shapes) < 60:
            shapes[key] = meta["shape"]
            used += n
    # The smallest tensor of every MBW block too, so that the block layout is SD1.5's.
    wanted = [f".input_blocks.{i}." for i in range(12)] + [".middle_block."]
    wanted += [f".output_blocks.{i}." for i in range(12)]
    for key, meta in sorted(comps["diffuser"].items(), key=lambda kv: math.prod(kv[1]["shape"])):
        part = next((w for w in wanted if w in key), None)
        if part is not None and not any(part in k for k in shapes):
            shapes[key] = meta["shape"]
    for comp in ("clip_l", "vae"):
        small = [k for k, m in sorted(comps[comp].items()) if math.prod(m["shape"]) <= 1024]
        shapes.update({k: comps[comp][k]["shape"] for k in small[:6]})
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert pid in shapes
    g = torch.Generator().manual_seed(0)
    base = {k: (0.02 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    base[pid] = torch.arange(77).unsqueeze(0)
    d = tmp_path_factory.mktemp("sd15")
    save_file(base, d / "base.safetensors")
    teachers = []
    for i in range(3):
        t = {
            k: (v.float() + 0.005 * torch.randn(v.shape, generator=g)).half()
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        save_file(t, d / f"t{i}.safetensors")
        teachers.append(d / f"t{i}.safetensors")
    return d / "base.safetensors", teachers, d


def _both(sd15, method: str, n_teachers: int = 3, **params):
    from dmm.merge.mecha import merge_files_mecha

    base, teachers, d = sd15
    ts = teachers[:n_teachers]
    merge_files(base, ts, d / "ours.safetensors", method, **params)
    info = merge_files_mecha(
        base, ts, d / "mecha.safetensors", method, threads=0, merge_options=FAST, **params
    )
    return load_file(d / "ours.safetensors"), load_file(d / "mecha.safetensors"), info


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Both compute in float32 and round to fp16; sums in another order may land
    # one fp16 ulp apart (fp16 eps = 9.8e-4).
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-6)


@needs_mecha
def test_mecha_detects_sd1_ldm_from_a_subset(sd15):
    from dmm.merge.mecha import detect_config

    assert detect_config(sd15[0]) == "sd1-ldm"


@needs_mecha
@pytest.mark.parametrize(
    "method, params",
    [
        ("weighted", {}),
        ("weighted", {"weights": [1, 2, 3]}),
        ("task_arithmetic", {"weights": [1, 2, 3], "lam": 0.7}),
        ("ties", {"k": 1.0, "lam": 0.9}),
    ],
)
def test_mecha_matches_deterministic_methods(sd15, method, params):
    ours, mecha, info = _both(sd15, method, **params)
    assert ours.keys() == mecha.keys()
    for key in ours:
        assert ours[key].dtype == mecha[key].dtype, key
        _close(ours[key], mecha[key])
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert mecha[pid].dtype == torch.int64 and torch.equal(mecha[pid], torch.arange(77)[None])
    assert info["record"]["mecha_config"] == "sd1-ldm" and info["copied"] == 1


@needs_mecha
def test_mecha_ties_k02_differs_only_at_its_extra_kept_entry(sd15):
    """sd-mecha keeps n - int((1-k) n) + 1 entries per tensor, dmm ceil(k n).

    Outside the entries only sd-mecha keeps (|tau| in [its threshold, ours)), the
    results must agree to rounding; inside they may differ.
    """
    base, teachers, _ = sd15
    ours, mecha, _ = _both(sd15, "ties")
    b = load_file(base)
    ts = [load_file(t) for t in teachers]
    boundary_total = differing = 0
    for key in b:
        if not key.startswith(UNET):
            continue
        boundary = torch.zeros(b[key].shape, dtype=torch.bool)
        for t in ts:
            mag = (t[key].float() - b[key].float()).abs().flatten()
            n = mag.numel()
            v_mecha = torch.kthvalue(mag, max(int((1 - 0.2) * n), 1)).values
            v_ours = torch.kthvalue(mag, n - M.keep_count(n, 0.2) + 1).values
            boundary |= ((mag >= v_mecha) & (mag < v_ours)).view(b[key].shape)
        boundary_total += int(boundary.sum())
        _close(ours[key][~boundary], mecha[key][~boundary])
        far = (ours[key].float() - mecha[key].float()).abs() > 1e-3 * mecha[key].float().abs()
        differing += int((far & boundary).sum())
    n_keys = sum(k.startswith(UNET) for k in b)
    print(f"ties k=0.2: {differing} entries differ, {boundary_total} boundary, {n_keys} keys")
    # about one extra entry per tensor and teacher (more only for fp16 ties in |tau|)
    assert 0 < differing <= boundary_total <= 3 * 3 * n_keys


def _drop_stats(out: dict, b: dict, t: dict, p: float) -> float:
    dropped = total = 0
    for key in b:
        if not key.startswith(UNET):
            continue
        same = out[key] == b[key]
        dropped += int(same.sum())
        total += same.numel()
        expected = (b[key].float() + (t[key].float() - b[key].float()) / (1 - p)).half()
        _close(out[key][~same], expected[~same])  # kept entries scaled by 1/(1-p)
    return dropped / total


@needs_mecha
@pytest.mark.parametrize("method, params", [("dare_linear", {}), ("dare_ties", {"k": 1.0})])
def test_mecha_dare_statistics_match(sd15, method, params):
    """Masks cannot match (different RNGs), so compare what DARE promises."""
    base, teachers, _ = sd15
    ours, mecha, _ = _both(sd15, method, n_teachers=1, **params)
    b, t = load_file(base), load_file(teachers[0])
    for out in (ours, mecha):
        assert abs(_drop_stats(out, b, t, 0.9) - 0.9) < 0.01
    # Finding: sd-mecha reuses one seed for every key, so same-shaped tensors get
    # the same mask; dmm seeds per key.
    k1, k2 = (UNET + f"input_blocks.1.0.in_layers.0.{s}" for s in ("bias", "weight"))
    assert torch.equal(mecha[k1] == b[k1], mecha[k2] == b[k2])
    assert not torch.equal(ours[k1] == b[k1], ours[k2] == b[k2])


@needs_mecha
def test_mecha_component_matches_only_prefix(sd15):
    from dmm.merge.mecha import merge_files_mecha

    base, teachers, d = sd15
    merge_files(base, teachers, d / "ours.safetensors", "weighted", only_prefix=UNET)
    merge_files_mecha(
        base,
        teachers,
        d / "mecha.safetensors",
        "weighted",
        component="diffuser",
        threads=0,
        merge_options=FAST,
    )
    ours, mecha, b = (
        load_file(d / f) for f in ("ours.safetensors", "mecha.safetensors", "base.safetensors")
    )
    for key in b:
        _close(ours[key], mecha[key])
        if not key.startswith(UNET):
            assert torch.equal(ours[key], b[key]) and torch.equal(mecha[key], b[key]), key
    with pytest.raises(MergeError, match="takes no teacher weights"):
        merge_files_mecha(base, teachers, d / "x.safetensors", "ties", weights=[1, 2, 3])
    assert not (d / "x.safetensors").exists()


# --- block weights (MBW) -------------------------------------------------------

# The SD1.5 diffusers UNet key -> LDM block, from the LDM layout (input_blocks.N.0 =
# resnet, .1 = attention, downsamplers at 3/6/9; output_blocks.N.2 or .1 = upsampler).
SD15_DIFFUSERS_BLOCKS = {
    "conv_in.weight": "IN00",
    "time_embedding.linear_1.weight": "BASE",
    "down_blocks.0.resnets.0.conv1.weight": "IN01",
    "down_blocks.0.attentions.1.proj_in.weight": "IN02",
    "down_blocks.0.downsamplers.0.conv.weight": "IN03",
    "down_blocks.1.attentions.0.proj_out.bias": "IN04",
    "down_blocks.2.downsamplers.0.conv.bias": "IN09",
    "down_blocks.3.resnets.1.conv2.weight": "IN11",
    "mid_block.attentions.0.norm.weight": "M00",
    "up_blocks.0.resnets.2.conv1.weight": "OUT02",
    "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
    "up_blocks.1.attentions.0.proj_in.weight": "OUT03",
    "up_blocks.2.upsamplers.0.conv.weight": "OUT08",
    "up_blocks.3.attentions.2.proj_out.weight": "OUT11",
    "conv_out.weight": "OUT11",
}


def test_block_layout_of_sd15_in_both_namings():
    hf = detect_layout(SD15_DIFFUSERS_BLOCKS)
    assert (hf.n_in, hf.n_out, hf.ldm, hf.layers) == (12, 12, False, 2)
    assert len(hf.names) == 26 and hf.names[:2] == ["BASE", "IN00"] and hf.names[13] == "M00"
    for key, block in SD15_DIFFUSERS_BLOCKS.items():
        assert hf.block_of(key) == block, key
    ldm = {
        "model.diffusion_model.time_embed.0.weight": "BASE",
        "model.diffusion_model.input_blocks.0.0.weight": "IN00",
        "model.diffusion_model.input_blocks.11.0.in_layers.0.bias": "IN11",
        "model.diffusion_model.middle_block.1.norm.bias": "M00",
        "model.diffusion_model.output_blocks.2.1.conv.weight": "OUT02",
        "model.diffusion_model.output_blocks.11.1.proj_out.bias": "OUT11",
        "model.diffusion_model.out.2.weight": "OUT11",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias": "BASE",
    }
    layout = detect_layout(ldm)
    assert (layout.n_in, layout.n_out, layout.ldm) == (12, 12, True)
    assert {k: layout.block_of(k) for k in ldm} == ldm


def test_block_layout_of_the_zoo_unet_covers_every_block():
    from dmm.student.export import unet_ldm_key_map
    from dmm.zoo.models import make_unet

    unet = make_unet(8)
    keys = list(unet.state_dict())
    layout = detect_layout(keys)
    # 3 levels, 1 layer each: conv_in + 3 x (resnet) + 2 downsamplers; 3 x 2 up.
    assert (layout.n_in, layout.n_out) == (6, 6)
    assert {layout.block_of(k) for k in keys} == set(layout.names)
    # Every key lands in the block of its LDM name (the exporter's own key map).
    ldm = unet_ldm_key_map(keys, unet.config)
    ldm_layout = detect_layout(ldm.values())
    assert (ldm_layout.n_in, ldm_layout.n_out) == (6, 6)
    for key in keys:
        assert layout.block_of(key) == ldm_layout.block_of(ldm[key]), (key, ldm[key])


def test_block_strength_scales_the_merge_against_the_base():
    half = merge("weighted", strength=0.5)
    torch.testing.assert_close(half, (BASE + merge("weighted")) / 2)
    for method in ("task_arithmetic", "ties", "dare_linear"):
        assert torch.equal(merge(method, strength=0.0), BASE), method
        torch.testing.assert_close(merge(method, strength=0.5, lam=0.8), merge(method, lam=0.4))
    with pytest.raises(ValueError, match="must be finite"):
        merge("ties", strength=math.nan)


def test_block_weights_of_the_wrong_length_are_one_line_errors(tiny_zoo, tmp_path):
    zoo, teachers = tiny_zoo
    out = tmp_path / "m"
    with pytest.raises(DmmError, match=r"got 3 values, but this UNet has 13 blocks") as info:
        merge_unets(zoo / "base", teachers, out, "ties", block_weights=[1, 1, 1])
    assert "\n" not in str(info.value) and not out.exists()
    r = _cli(["--method", "weighted", "--zoo", zoo, "--out", out, "--block-weights", "1,2"])
    assert r.exit_code == 2 and "give 13, or 14 with BASE first" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ValidationError, match="finite"):
        MergeConfig(method="ties", block_weights=[math.nan] * 13)
    with pytest.raises(DmmError, match="need a UNet"):
        block_strengths([1.0], ["a.weight"])


def test_block_weights_merge_per_block_and_are_recorded(tiny_zoo, tmp_path):
    zoo, teachers = tiny_zoo
    bw = [0.0] * 7 + [1.0] * 7  # BASE + IN00..IN05 at 0, M00 + OUT00..OUT05 at 1
    merge_unets(zoo / "base", teachers, tmp_path / "mbw", "task_arithmetic", block_weights=bw)
    merge_unets(zoo / "base", teachers, tmp_path / "plain", "task_arithmetic")
    rec = json.loads((tmp_path / "mbw" / "merge.json").read_text())
    assert rec["block_weights"]["BASE"] == 0.0 and rec["block_weights"]["M00"] == 1.0
    assert (
        read_merge_metadata(tmp_path / "mbw" / UNET_WEIGHTS)["block_weights"]
        == (rec["block_weights"])
    )
    assert json.loads((tmp_path / "plain" / "merge.json").read_text())["block_weights"] is None
    mbw, plain = (load_file(tmp_path / d / UNET_WEIGHTS) for d in ("mbw", "plain"))
    base = load_file(zoo / "base" / UNET_WEIGHTS)
    layout = detect_layout(base)
    for key in base:
        early = layout.names.index(layout.block_of(key)) < 7
        assert torch.equal(mbw[key], base[key] if early else plain[key]), key
    assert not torch.equal(plain["conv_in.weight"], base["conv_in.weight"])


def test_nan_teacher_is_refused_naming_it_and_writes_nothing(files, tmp_path):
    base, teachers = files
    bad = load_file(teachers[1])
    bad["a.bias"][3] = math.nan
    save_file(bad, tmp_path / "nan.safetensors")
    bad["a.bias"][3] = math.inf
    save_file(bad, tmp_path / "inf.safetensors")
    out = tmp_path / "o.safetensors"
    for name in ("nan", "inf"):
        for method in ("weighted", "ties"):
            ts = [teachers[0], tmp_path / f"{name}.safetensors"]
            with pytest.raises(MergeError, match=f"teacher .*{name}.safetensors has NaN/inf"):
                merge_files(base, ts, out, method)
            assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name[0] == "."]
    args = ["--method", "ties", "--base", base, "--teacher", tmp_path / "nan.safetensors"]
    r = _cli([*args, "--out", out])
    assert r.exit_code == 2 and "nan.safetensors has NaN/inf values in 'a.bias'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_progress_counts_the_merged_keys(files, tmp_path):
    base, teachers = files
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    summary = merge_files(base, teachers, tmp_path / "o.safetensors", "ties", progress=Bar)
    (bar,) = bars
    assert bar.total == bar.n == summary["merged"] and bar.closed


@needs_mecha
@pytest.mark.parametrize(
    "method, params",
    [
        ("weighted", {"weights": [1, 2, 3]}),
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {"k": 1.0, "lam": 0.9}),
    ],
)
def test_mecha_matches_block_weighted_merges(sd15, method, params):
    # 26 distinct weights (BASE first), so a block mapped to the wrong weight shows.
    bw = [0.1 + 0.035 * i for i in range(26)]
    ours, mecha, info = _both(sd15, method, block_weights=bw, **params)
    plain, _, _ = _both(sd15, method, **params)
    assert info["record"]["block_weights"]["OUT11"] == pytest.approx(bw[-1])
    changed = 0
    for key in ours:
        _close(ours[key], mecha[key])
        changed += not torch.equal(ours[key], plain[key])
    assert changed > 60
