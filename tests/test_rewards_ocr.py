"""The OCR reward with the real RapidOCR engine (PP-OCR ONNX models shipped in the wheel), in process and
behind a real server; its models loaded from a folder and from S3 (moto)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from reward_fixtures import moto_s3, render_text, serving

from flowgrpo_core.rewards.ocr import OcrReward, normalise, ocr_score, quoted_text
from flowgrpo_core.serving.client import RemoteReward
from flowgrpo_core.sources import WeightsSourceError

PHRASES = ["Hello World", "Kubeflow", "Open 24 Hours", "Flow GRPO"]


@pytest.fixture(scope="module")
def ocr():
    return OcrReward()


def test_quoted_text_and_normalisation():
    assert quoted_text('a neon sign that says "Open 24h" at night') == "Open 24h"
    assert quoted_text("a poster reading “Grand Opening”") == "Grand Opening"
    assert quoted_text('first "one" then "two"') == "one"
    assert quoted_text("no quotes") is None and quoted_text('empty ""') is None
    assert normalise(" Hello\tWorld \n") == "helloworld"


def test_score_rules_in_closed_form():
    assert ocr_score("Hello World", "hello world") == 1.0
    assert ocr_score("Hel1o World", "Hello World") == pytest.approx(1 - 1 / 10)
    assert ocr_score("", "abcd") == 0.0 and ocr_score("", "", rule="strict") == 1.0
    # strict: extra text costs like missing text (normalised by the longer string)
    assert ocr_score("abcdXXXX", "abcd", rule="strict") == pytest.approx(1 - 4 / 8)
    # reference (Flow-GRPO, the default): containment is a full score, the distance is capped at the target length
    assert ocr_score("XXabcdXX", "abcd") == 1.0 == ocr_score("XXabcdXX", "abcd", rule="reference")
    assert ocr_score("zzzzzzzzzz", "abcd", rule="reference") == 0.0
    assert ocr_score("abxd", "abcd", rule="reference") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown OCR rule"):
        ocr_score("a", "a", rule="lenient")


def test_server_scores_the_right_text_high_and_wrong_text_lower(ocr):
    images = [render_text(phrase, seed=i) for i, phrase in enumerate(PHRASES)]
    right = [f'a photo of a sign that says "{phrase}"' for phrase in PHRASES]
    wrong = [
        f'a photo of a sign that says "{phrase}"'
        for phrase in ["Goodbye Moon", "Airflow", "Closed Sunday", "Flow DPO"]
    ]
    with serving(ocr) as server:
        reward = RemoteReward("ocr", server.url)
        out_right = reward(images, right)
        out_wrong = reward(images, wrong)
    assert np.all(out_right.scores >= 0.9), list(zip(out_right.details["ocr_text"], out_right.scores))
    assert np.all(out_wrong.scores < out_right.scores), list(
        zip(out_wrong.details["ocr_text"], out_wrong.scores)
    )
    assert out_right.details["target"] == PHRASES
    assert [normalise(t) for t in out_right.details["ocr_text"]] == [normalise(p) for p in PHRASES]
    # the engine read every phrase exactly, so the wrong-text scores are the closed-form edit similarities
    expected = [ocr_score(phrase, quoted_text(prompt)) for phrase, prompt in zip(PHRASES, wrong)]
    np.testing.assert_allclose(out_wrong.scores, expected)


def test_blank_image_scores_zero(ocr):
    blank = render_text("", seed=3)
    assert ocr([blank], ['"Hello"']).scores[0] == 0.0


def test_strict_rule_penalises_extra_text_that_the_reference_rule_ignores(ocr):
    image = render_text("Kubeflow XYZ 987", seed=1)
    reference = ocr([image], ['a sign "Kubeflow"']).scores[0]  # the default rule
    strict = OcrReward(rule="strict")([image], ['a sign "Kubeflow"']).scores[0]
    assert reference == 1.0 and strict < 0.7


def test_prompt_without_quoted_text_is_refused(ocr):
    with pytest.raises(ValueError, match="no text in double quotes"):
        ocr([render_text("x")], ["a sign without quotes"])


@pytest.fixture(scope="module")
def ocr_model_folder(tmp_path_factory) -> Path:
    """The PP-OCR ONNX models, copied out of the rapidocr wheel as a user would ship them."""
    import rapidocr

    folder = tmp_path_factory.mktemp("ppocr")
    for onnx in (Path(rapidocr.__file__).parent / "models").glob("*.onnx"):
        shutil.copy(onnx, folder / onnx.name)
    return folder


def test_ocr_models_load_from_a_folder_and_from_s3(ocr, ocr_model_folder, tmp_path):
    from flowgrpo_core.storage import s3_client, upload_folder

    images = [render_text(phrase, seed=i) for i, phrase in enumerate(PHRASES[:2])]
    prompts = [f'"{phrase}"' for phrase in PHRASES[:2]]
    expected = ocr(images, prompts)
    from_folder = OcrReward(model=str(ocr_model_folder))(images, prompts)
    assert from_folder.details["ocr_text"] == expected.details["ocr_text"]
    with moto_s3(tmp_path):
        s3_client().create_bucket(Bucket="models")
        upload_folder(ocr_model_folder, "s3://models/ppocr")
        from_s3 = OcrReward(model="s3://models/ppocr")
        assert from_s3.info["model"] == "s3://models/ppocr"
        out = from_s3(images, prompts)
    np.testing.assert_array_equal(out.scores, expected.scores)
    assert out.details["ocr_text"] == expected.details["ocr_text"]


def test_ocr_folder_without_a_recogniser_is_a_clear_error(ocr_model_folder, tmp_path):
    for onnx in ocr_model_folder.glob("*det*.onnx"):
        shutil.copy(onnx, tmp_path / onnx.name)
    with pytest.raises(WeightsSourceError, match=r"needs a \*det\*.onnx and a \*rec\*.onnx"):
        OcrReward(model=str(tmp_path))
