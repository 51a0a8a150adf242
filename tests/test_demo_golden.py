"""Greedy outputs of the trained demo checkpoints through the model classes (issue 11's goldens).

They pin the shipped files and every layer under the task methods: tokenizer, checkpoint reader,
int8 linears, the decode loop and the task formats. Regenerated checkpoints change them; update them
then, with the new files' held-out perplexity checked (bminf/demo/README.md).
"""
import pytest

import bminf

CPM1 = {
    "中国经济": ("发展的宏观经济理论,是中国经济发展的宏观经济理论。", True),
    "今天天气很好，": ("周边风景很好,周边风景很好,周边风景", False),
}
CPM2_GENERATE = {"新年到了，": ("，但我觉得很好，我觉得很好，我觉得很好，我觉得很好，我觉得", False)}
CPM2_FILL = {"北京是中国的<span>。": [{"position": 6, "text": "的"}],
             "这家酒店的服务<span>，房间也很<span>。": [{"position": 7, "text": "很"}, {"position": 18, "text": "的"}]}
EVA = {("这家酒店的房间很干净。",): ("房间设施比较一般，早餐很好。", True)}


@pytest.fixture(scope="module")
def models():
    return (bminf.models.CPM1(version="cpm1-demo", device="cpu"), bminf.models.CPM2(version="cpm2-demo", device="cpu"),
            bminf.models.EVA(version="eva-demo", device="cpu"))


def test_cpm1_demo_golden(models):
    for prompt, expected in CPM1.items():
        assert models[0].generate(prompt, max_tokens=24, temperature=0) == expected
    assert models[0].generate(list(CPM1), max_tokens=24, temperature=0) == list(CPM1.values())


def test_cpm2_demo_golden(models):
    for prompt, expected in CPM2_GENERATE.items():
        assert models[1].generate(prompt, max_tokens=24, temperature=0) == expected
    for prompt, expected in CPM2_FILL.items():
        assert models[1].fill_blank(prompt, max_tokens=24, temperature=0) == expected


def test_eva_demo_golden(models):
    for context, expected in EVA.items():
        assert models[2].dialogue(list(context), max_tokens=24, temperature=0) == expected
