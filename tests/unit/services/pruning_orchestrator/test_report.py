"""The audit report's pieces: human names, verdict words and colours, next steps, the
charts (valid PNGs), and the HTML of each report kind (self-contained, summary first)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from modelguard.plots import (
    bar_chart_png,
    mad_chart_png,
    pruning_curve_png,
    robust_accuracy_png,
)
from modelguard.services.pruning_orchestrator.report import (
    TONE_COLOURS,
    build_report,
    field_name,
    human_value,
    mad_chart,
    next_steps,
    report_document,
    stage_verdict,
)
from modelguard.store.local import LocalStore
from tests.unit.services.pruning_orchestrator import report_cases


def _png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()  # decodes every pixel: a truncated file raises
    return image.size


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path)


def test_fields_and_values_have_human_names() -> None:
    assert field_name("l1_norm") == "Trigger size (L1 norm)"
    assert field_name("autocorrelation_lag") == "Autocorrelation lag"
    assert field_name("reversed_asr") == "Attack success of the reversed trigger"
    assert field_name("some_new_field") == "Some new field"  # unknown keys stay readable
    assert human_value("MODEL_FORMAT_SAFETENSORS") == "safetensors"
    assert human_value(True) == "yes" and human_value(None) == "–"
    assert human_value(0.123456) == "0.1235"
    assert human_value(list(range(20))).endswith("… (20 in all)")


@pytest.mark.parametrize(
    ("name", "summary", "word", "tone"),
    [
        ("trigger-reversal", {"verdict": "infected", "flagged": [3]}, "infected", "bad"),
        ("trigger-reversal", {"verdict": "clean", "flagged": []}, "clean", "good"),
        ("trigger-reversal", {"verdict": "inconclusive"}, "inconclusive", "warn"),
        ("leak-detector", {"verdict": "leak", "score": 4.0, "threshold": 1.0}, "leak", "bad"),
        ("leak-detector", {"verdict": "benign", "score": 0.2, "threshold": 1.0}, "benign", "good"),
        ("repair", {"verdict": "repaired", "before": {}, "after": {}}, "repaired", "good"),
        ("repair", {"verdict": "partially repaired"}, "partially repaired", "warn"),
        ("robustness", report_cases.robustness(masked=False), "fragile", "bad"),
        ("robustness", report_cases.robustness(masked=True), "masked gradients", "warn"),
        ("robustness", {"verdict": "robust", "points": [{"eps": 0.3}]}, "robust", "good"),
    ],
)
def test_each_verdict_has_its_word_and_colour(
    name: str, summary: dict[str, object], word: str, tone: str
) -> None:
    verdict = stage_verdict(name, {"state": "done", "summary": summary})
    assert (verdict.word, verdict.tone, verdict.colour) == (word, tone, TONE_COLOURS[tone])
    assert verdict.sentence.endswith(".")


def test_a_failed_stage_says_why_and_a_skipped_one_is_neutral() -> None:
    failed = stage_verdict(
        "repair", {"state": "failed", "error_code": "INTERNAL", "error": "out of memory"}
    )
    assert (failed.word, failed.tone) == ("failed", "bad")
    assert "INTERNAL" in failed.sentence and "out of memory" in failed.sentence
    skipped = stage_verdict("repair", {"state": "skipped", "summary": {}})
    assert (skipped.word, skipped.tone) == ("skipped", "neutral")


def test_a_repair_that_edited_the_classifier_says_so_and_not_that_pruning_did_it() -> None:
    edit = "the rows of label(s) 88 of the classifier model._fc (re-fit)"

    def sentence(**summary: object) -> str:
        figures = {"before": {"reversed_asr": 0.97}, "after": {"reversed_asr": 0.0}}
        stage = {"state": "done", "summary": {"layer": "model._fc:in", **figures, **summary}}
        return stage_verdict("repair", stage).sentence

    edited = sentence(edit=edit, pruned=[])
    assert edited.startswith(f"Pruned nothing and edited {edit}: ")
    assert "went from 97.0% to 0.0%" in edited
    both = sentence(edit=edit, pruned=[{}, {}])
    assert both.startswith(f"Pruned 2 neurons of model._fc:in and edited {edit}: ")
    assert sentence(pruned=[{}]).startswith("Pruned 1 neuron of model._fc:in: ")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("infected-repaired", "Download the repaired model"),
        ("clean", "may be deployed"),
        ("leak", "Do not publish the weights"),
        ("failed-stage", "Run the audit again: Backdoor (reversed triggers) failed"),
        ("fragile", "Do not deploy where inputs can be manipulated"),
        ("masked-gradients", "Do not trust the robustness figures"),
    ],
)
def test_next_steps_follow_the_verdicts(store: LocalStore, case: str, expected: str) -> None:
    document = report_document(report_cases.CASES[case](store), finished_at=0.0)
    steps = next_steps(document)
    assert any(expected in step for step in steps), steps
    if case == "infected-repaired":
        assert "do not deploy the original" in steps[0]


def test_the_charts_are_valid_pngs() -> None:
    mad = mad_chart_png([0, 1, 2, 3], [40.0, 41.0, 4.0, 39.0], {2}, median=39.5, flag_line=30)
    curve = pruning_curve_png([1, 2, 2, 3], [0.9, 0.5, 0.6, 0.1], [1, 1, 0.9, 0.99], [0, 0, 1, 0])
    bars = bar_chart_png(["sign imbalance"], [4.0], threshold=1.0)
    robust = robust_accuracy_png([0.1, 0.3], [0.5, 0.1], {"pgd": [0.5, 0.2]}, clean_accuracy=1)
    for png in (mad, curve, bars, robust):
        width, height = _png_size(png)
        assert 300 <= width <= 800 and height >= 100
    with pytest.raises(ValueError):
        mad_chart_png([0, 1], [1.0], set(), median=1.0)
    with pytest.raises(ValueError):
        robust_accuracy_png([0.1, 0.3], [0.5], {})


def test_charts_are_reproducible() -> None:
    """A report is content-addressed: the same record must draw the same bytes."""
    args = ([1, 2, 3], [0.9, 0.5, 0.1], [1.0, 0.99, 0.98], [False, True, False])
    assert pruning_curve_png(*args) == pruning_curve_png(*args)


def test_mad_chart_draws_only_optimised_labels_and_counts_the_others(store: LocalStore) -> None:
    summary = report_cases.reversal(store, classes=1000, optimised=24, flagged=(5,))
    chart = mad_chart(summary)
    assert chart is not None
    png, caption = chart
    _png_size(png)
    assert "24 of 1000 labels were optimised; 976 were triaged out" in caption


@pytest.mark.parametrize("case", list(report_cases.CASES))
def test_every_report_kind_is_one_self_contained_page_answer_first(
    store: LocalStore, case: str
) -> None:
    record = report_cases.CASES[case](store)
    report_json, report_html = build_report(record, store, finished_at=1.0)
    page = report_html.decode()
    assert json.loads(report_json)["audit_id"] == record.audit_id
    assert build_report(record, store, finished_at=1.0)[1] == report_html  # deterministic
    # self-contained and inert: no scripts, no external resources
    assert "<script" not in page
    assert not re.search(r'(src|href)="(?!data:image/png;base64,)', page)
    for encoded in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        _png_size(base64.b64decode(encoded))
    # the summary comes before any stage; raw names never reach the reader
    assert page.index('id="summary"') < page.index('id="stage-')
    assert "MODEL_FORMAT_SAFETENSORS" not in page and "autocorrelation_lag" not in page
    assert "What to do next" in page
    # the raw figures are kept, folded
    if case != "failed-stage":
        assert "<details" in page and "Per-layer statistics" in page


def test_infected_report_shows_the_trigger_mad_chart_curve_and_figures(store: LocalStore) -> None:
    _, report_html = build_report(report_cases.infected_and_repaired(store), store, 1.0)
    page = report_html.decode()
    for caption in ("mask", "pattern", "clean image", "same image stamped"):
        assert f"<figcaption>{caption}</figcaption>" in page
    assert "Reversed trigger of label 3" in page
    assert "Smallest trigger that flips clean images to each label" in page  # MAD chart
    assert "Pruning curve: 240 steps, 48 rolled back" in page
    assert "99.0%</td><td>→</td><td>2.0%" in page  # before → after reversed ASR
    assert "98.5%</td><td>→</td><td>97.2%" in page  # clean accuracy


def test_leak_report_explains_each_flagged_layer(store: LocalStore) -> None:
    _, report_html = build_report(report_cases.leaking(store), store, 1.0)
    page = report_html.decode()
    assert "In fc1, sign imbalance lies 4.00×" in page
    assert "In conv2, negative co-kurtosis lies 1.50×" in page
    assert page.count("training procedure hides data") == 2


def test_robustness_report_plots_accuracy_against_eps_and_says_why_it_decided(
    store: LocalStore,
) -> None:
    _, report_html = build_report(report_cases.fragile(store), store, 1.0)
    page = report_html.decode()
    section = page[page.index('id="stage-robustness"') :]
    assert section.index("Robustness to evasion attacks") < section.index("</h2>")
    # the verdict and its rule in the summary, with the figures it read
    summary = page[page.index('id="summary"') : page.index('id="stage-')]
    assert "fragile</span> <b>Robustness to evasion attacks</b>: Small perturbations" in summary
    assert "0.0% of the images stay correct under every attack at ε = 0.3 (L∞" in summary
    assert "under the 50.0% floor" in summary
    # the chart: every attack and the combined curve, and the check passed in words
    assert "<figcaption>Accuracy against ε under untargeted fgsm, pgd, pgd-strong (200 " in page
    assert "Gradient-masking check: passed" in section
    assert "Note: a seeded subset of 200 images was attacked." in section
    # the folded figures: one column per attack, the masking check by its own names
    assert "<th>FGSM accuracy</th><th>PGD accuracy</th><th>Stronger PGD accuracy</th>" in page
    assert "Flagged target labels</dt><dd>no" not in section


def test_masked_gradients_are_reported_as_sentences(store: LocalStore) -> None:
    _, report_html = build_report(report_cases.masked_gradients(store), store, 1.0)
    page = report_html.decode()
    section = page[page.index('id="stage-robustness"') :]
    assert "masked gradients</span>" in section
    assert "these figures are an upper bound nobody should rely on." in page
    findings = re.findall(r"<li>([^<]*)</li>", section)
    assert "At ε = 0.05 PGD leaves more images correct (83.0%) than one FGSM step (71.0%)." in (
        findings
    )
    assert any(f.startswith("PGD with an unbounded ε") for f in findings), findings
    assert "Gradient-masking check: passed" not in section


def test_an_audit_without_robustness_says_the_stage_did_not_run(store: LocalStore) -> None:
    document = report_document(report_cases.clean(store), finished_at=0.0)
    verdict = stage_verdict("robustness", document["stages"]["robustness"])
    assert (verdict.word, verdict.tone) == ("skipped", "neutral")
