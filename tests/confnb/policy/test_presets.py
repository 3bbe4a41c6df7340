"""Upload presets: each is TOML the vault accepts, says what it promises, and explains itself from its own parse."""

from __future__ import annotations

import tomllib

from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy
from confnb.policy.presets import PRESETS, upload_presets


def test_every_preset_parses_and_explains_itself() -> None:
    listed = upload_presets()
    assert [entry["id"] for entry in listed] == [preset.id for preset in PRESETS]
    assert len({entry["id"] for entry in listed}) == len(listed) >= 3
    for entry in listed:
        policy = OutputPolicy.from_toml(entry["toml"])
        assert set(tomllib.loads(entry["toml"])) == {"policy", "release", "display"}
        assert entry["explanation"] == explain_output(policy) and entry["title"]


def test_the_presets_promise_what_their_titles_say() -> None:
    policies = {preset.id: preset.policy() for preset in PRESETS}
    aggregates = policies["aggregates-10"]
    assert "aggregate" in aggregates.allow and aggregates.min_group_size == 10
    assert not aggregates.allow & {"model_parameters", "predict_public"}
    metrics = policies["model-metrics"]
    assert {"model_metrics", "model_parameters"} <= metrics.allow and "aggregate" not in metrics.allow
    assert policies["schema-counts"].allow == {"schema", "row_count"}
    for policy in policies.values():
        assert policy.tracebacks == "redacted" and "predict_public" not in policy.allow
        assert not any(mime.startswith("image/") for mime in policy.mime)
