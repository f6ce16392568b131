"""The model card: what a user needs to know and do with a merged student."""

from __future__ import annotations

from dmm.student.card import model_card

STYLES = ["pastel", "neon", "sepia"]
TEACHERS = [
    {
        "name": "pastel",
        "source": "zoo:pastel",
        "sha256": "a" * 64,
        "license": "CreativeML OpenRAIL-M",
    },
    {"name": "neon", "source": "hub:someone/neon@abc", "sha256": "b" * 64, "license": "MIT"},
    {"name": "sepia", "source": "teachers/sepia", "sha256": "c" * 64},
]
EVALUATION = {
    "feature_extractor": "zoo-probe",
    "styles": STYLES,
    "fid_t_ratio": 1.2345,
    "fid_t_independent_ratio": 1.1111,
    "style_accuracy": {"pastel": 0.9, "neon": 0.75, "sepia": None},
    "teacher_accuracy": {"pastel": 1.0, "neon": 0.8, "sepia": None},
}


def test_minimal_card_lists_styles_and_four_ways_to_load():
    card = model_card(STYLES)
    assert card.startswith("# dmm-student\n")
    assert "Styles: `pastel`, `neon`, `sepia`" in card
    assert "import dmm" in card and "DMMStudentPipeline.from_pretrained" in card
    assert 'custom_pipeline="dmm_student", trust_remote_code=True' in card
    assert "dmm export --student data/student/student --style pastel --format single-file" in card
    assert 'mlflow.pyfunc.load_model("models:/dmm-student@champion")' in card
    assert "mlflow models serve -m models:/dmm-student@champion" in card
    assert "/invocations" in card
    assert "No teacher states a licence" in card
    assert "## Evaluation gate" not in card and "## Teachers" not in card


def test_full_card_has_teachers_merge_gate_grid_and_licences():
    card = model_card(
        STYLES,
        name="my-merge",
        base="runwayml/stable-diffusion-v1-5",
        teachers=TEACHERS,
        merge_kind="incremental",
        parent_version="3",
        evaluation=EVALUATION,
        gate_verdict="passed",
        sample_grid="samples/grid.png",
    )
    assert "Base: `runwayml/stable-diffusion-v1-5`" in card
    assert "Merge: incremental (parent version 3)" in card
    assert "| neon | `hub:someone/neon@abc` | `bbbbbbbbbbbbbbbb…` | MIT |" in card
    assert "| sepia | `teachers/sepia` | `cccccccccccccccc…` | not stated |" in card
    assert "| FD_t ratio | 1.234 |" in card or "| FD_t ratio | 1.235 |" in card
    assert "| FD_t ratio, independent seeds | 1.111 |" in card
    assert "| gate | passed |" in card
    assert "| neon | 0.75 | 0.80 |" in card and "| sepia | n/a | n/a |" in card
    assert "`zoo-probe` features" in card
    assert "![samples, one row per style: pastel, neon, sepia](samples/grid.png)" in card
    assert "models:/my-merge@champion" in card
    assert "inherits all of their licences" in card
    assert "Teachers' licences: `CreativeML OpenRAIL-M`, `MIT`." in card
