"""Output policies an analyst can pick when uploading a dataset of their own from JupyterLab.

An uploaded file has no data owner's broker behind it: the person uploading is the owner, and the policy they choose
travels with the encrypted file into the kernel, where the vault enforces it like any owner's. Few people want to
write TOML in an upload dialog, so a handful of common choices are offered, each as the exact TOML the vault will
parse and with the plain-language explanation derived from that same parse (so the words cannot drift from the
rules). The texts are parsed at import: a preset the vault would reject can never be offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy


@dataclass(frozen=True)
class Preset:
    """One choice in the upload dialog: ``toml`` is exactly what the browser sends with the encrypted file."""

    id: str
    title: str
    toml: str

    def policy(self) -> OutputPolicy:
        return OutputPolicy.from_toml(self.toml, source=f"upload preset {self.id}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "toml": self.toml, "explanation": explain_output(self.policy())}


# Display rules are the same for every preset: tables render as HTML, nothing binary (a PNG can carry any bytes),
# and tracebacks redacted, because an error message is the easiest place for a data value to slip out.
_DISPLAY = """[display]
mime = ["text/plain", "text/html"]
max_output_bytes = 1000000
tracebacks = "redacted"
"""

PRESETS: tuple[Preset, ...] = (
    Preset(
        id="aggregates-10",
        title="Aggregates of at least 10 records",
        toml='[policy]\nid = "upload-aggregates-10-v1"\n'
        "[release]\n"
        'allow = ["schema", "row_count", "aggregate"]\n'
        "min_group_size = 10\n" + _DISPLAY,
    ),
    Preset(
        id="model-metrics",
        title="Model metrics and coefficients",
        # min_group_size also bounds training sets: a model fitted on a handful of rows can describe them.
        toml='[policy]\nid = "upload-model-metrics-v1"\n'
        "[release]\n"
        'allow = ["schema", "row_count", "model_metrics", "model_parameters"]\n'
        "min_group_size = 10\n" + _DISPLAY,
    ),
    Preset(
        id="schema-counts",
        title="Schema and row counts only",
        toml='[policy]\nid = "upload-schema-counts-v1"\n[release]\nallow = ["schema", "row_count"]\n' + _DISPLAY,
    ),
)

for _preset in PRESETS:
    _preset.policy()  # fail at import, never in front of a user


def upload_presets() -> list[dict[str, Any]]:
    """The presets as the server's ``upload-policies`` endpoint returns them."""
    return [preset.to_dict() for preset in PRESETS]
