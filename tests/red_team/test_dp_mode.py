"""Differential-privacy mode end to end: the analyst API, a real vault, the owner's broker keeping the budget.

The owner's policy says ``[privacy] mode = "dp"``: nothing exact leaves but the schema and the public row count;
every noisy release is charged to the owner's budget at the broker before it leaves, and the broker refuses beyond
it. The attacks of exact mode are tried again and their numbers checked against the secret; the legitimate twins
must still get an answer close to the truth, with the account of what they spent.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import confnb as cn
from confnb.policy.output import OutputPolicy

BUDGET = 1.0
DP_POLICY = f"""
[policy]
id = "admissions-dp-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public"]
min_group_size = 10
never_release = ["patient_id"]
[privacy]
mode = "dp"
epsilon = {BUDGET}
delta = 1e-6
unit = "patient_id"
max_contributions = 1
public = ["row_count"]
[privacy.bounds]
cost = [0.0, 40000.0]
age = [0, 120]
length_of_stay = [0.0, 40.0]
[privacy.keys]
diagnosis = ["asthma", "copd", "diabetes", "fracture", "pneumonia", "sepsis"]
sex = ["F", "M"]
"""


@dataclass(frozen=True)
class Owner:
    datasets: Path
    broker_url: str
    store: Any


@pytest.fixture
def dp_owner(hospital_owner: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Owner]:
    """The admissions under the DP policy (or the test's variant of it), with a broker of their own (a fresh
    budget for each test)."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    store = OwnerStore.create(tmp_path / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    policy = OutputPolicy.from_toml(getattr(request, "param", DP_POLICY))
    encrypt_dataset(
        hospital_owner.frame, tmp_path / "datasets" / "admissions", store, "admissions", policy, attestation
    )
    with serve_locally(store) as url:
        yield Owner(tmp_path / "datasets", url, store)


Connect = Callable[[], Any]


@pytest.fixture
def kernel(dp_owner: Owner, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connect]:
    """Starts a fresh kernel (a new vault, the analyst API connected to it) each time it is called."""
    from confnb.analyst.session import current_session
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.service import VaultServer
    from kernel_enclave.vault.vault import Vault

    started: list[tuple[Any, Path]] = []
    monkeypatch.delenv("CONFNB_BROKER_URL", raising=False)

    def connect() -> Any:
        if started:
            current_session().close()
        directory = Path(tempfile.mkdtemp(prefix="cnb-"))
        vault = Vault(
            backend=simulated_backend,
            keys=VaultKeys.generate(),
            broker_url=dp_owner.broker_url,
            dataset_path=str(dp_owner.datasets),
        )
        server = VaultServer(vault, directory / "vault.sock")
        server.start()
        started.append((server, directory))
        monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(directory / "vault.sock"))
        return vault

    try:
        yield connect
    finally:
        current_session().close()
        for server, directory in started:
            server.close()
            shutil.rmtree(directory, ignore_errors=True)
        cn.set_epsilon(None)


def test_nothing_exact_leaves_but_the_schema_and_the_public_row_count(hospital_owner: Any, kernel: Connect) -> None:
    kernel()
    frame = hospital_owner.frame
    t = cn.open("admissions")
    assert "cost" in list(t.columns)
    assert t.count().release() == len(frame)  # the twin: public under the owner's policy
    assert t[["age", "cost"]].count().release() == len(frame)  # columns chosen: still the dataset's row count
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):  # a filter makes it a query: noisy only
        t[t.age >= 93].count().release()
    assert "rows" not in t[t.age >= 93].preview()
    for sealed in (t.cost.sum(), t.group_by("diagnosis").cost.mean(), t.describe(), t.diagnosis.value_counts()):
        with pytest.raises(cn.PolicyViolation) as refused:
            sealed.release()
        assert refused.value.rule == "privacy.mode"
        assert "epsilon" in str(refused.value)
    from sklearn.linear_model import LinearRegression

    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):
        cn.fit(LinearRegression(), t, target="cost", features=["age"])


def test_a_noisy_release_is_charged_and_says_what_it_spent(hospital_owner: Any, kernel: Connect) -> None:
    kernel()
    frame = hospital_owner.frame
    t = cn.open("admissions")
    released = t.group_by("diagnosis").cost.mean().release(epsilon=0.5)
    account = released.attrs["confnb_dp"]
    assert account["epsilon"] == pytest.approx(0.5)
    assert account["epsilon_remaining"] == {"admissions": pytest.approx(BUDGET - 0.5)}
    assert account["noise"] and all(item["scale"] > 0 for item in account["noise"])
    assert "noisy: ε = 0.5" in repr(released)
    truth = frame.groupby("diagnosis").cost.mean()
    assert sorted(released.index) == sorted(truth.index)
    error = (released.sort_index() - truth.sort_index()).abs()
    (noise,) = [item for item in account["noise"] if item["column"] == "cost"]
    assert noise["interval_95"] > 0
    assert float(error.max()) < 3 * noise["interval_95"]  # within its declared accuracy (95% each: 3x for margin)
    assert not np.allclose(released.sort_index().to_numpy(), truth.sort_index().to_numpy(), rtol=0, atol=1e-9)
    budget = cn.budget(t)["admissions"]
    assert budget["epsilon_spent"] == pytest.approx(0.5) and budget["epsilon_remaining"] == pytest.approx(0.5)


def test_the_differencing_attack_gives_noise_never_the_value(hospital_owner: Any, kernel: Connect) -> None:
    vault = kernel()
    frame = hospital_owner.frame
    target = frame.iloc[1234]
    t = cn.open("admissions")
    everyone = t.cost.sum().release(epsilon=0.2)
    others = t[t.age != int(target.age)].cost.sum().release(epsilon=0.2)  # a filter: refused grouped, fine whole
    assert isinstance(everyone, float) and everyone.dp["epsilon"] == pytest.approx(0.2)
    difference = float(everyone) - float(others)
    exact = float(frame[frame.age == target.age].cost.sum())
    assert abs(difference - exact) > 1e-6  # the noisy difference is not the exact value
    # The kernel's audit log names each charge; the broker's log has them too.
    charges = [entry for entry in vault.audit.entries() if entry["event"] == "budget-charge"]
    assert len(charges) == 2 and all(entry["fields"]["dataset"] == "admissions" for entry in charges)


def test_releases_stop_exactly_at_the_budget_and_a_new_kernel_does_not_reset_it(
    kernel: Connect, dp_owner: Owner
) -> None:
    from confnb.broker.audit import AuditKind, verify_log

    vault = kernel()
    t = cn.open("admissions")
    cn.set_epsilon(0.25)
    for _ in range(4):
        t.cost.sum().release()
    with pytest.raises(cn.PolicyViolation) as refused:
        t.cost.sum().release()
    assert refused.value.rule == "privacy.budget" and "exceed" in str(refused.value)
    # Both logs agree: the kernel's charges are the broker's, one for one.
    kernel_charges = [e["fields"]["charge"] for e in vault.audit.entries() if e["event"] == "budget-charge"]
    verification = verify_log(dp_owner.store.directory / "audit.sqlite", dp_owner.store.owner_public_key)
    assert verification.ok, verification.problems
    broker_charges = [e.detail["charge_id"] for e in verification.entries if e.kind is AuditKind.CHARGE]
    assert len(kernel_charges) == 4 and kernel_charges == broker_charges
    kernel()  # a restart: a new kernel, a new key release, the same owner's budget
    t = cn.open("admissions")
    assert cn.budget(t)["admissions"]["epsilon_remaining"] == pytest.approx(0.0)
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.budget"):
        t.cost.sum().release(epsilon=0.01)


def test_no_broker_no_release(kernel: Connect, dp_owner: Owner) -> None:
    vault = kernel()
    t = cn.open("admissions")
    vault._owners["admissions"] = ("http://127.0.0.1:9", vault._owners["admissions"][1])  # nobody listens there
    with pytest.raises(cn.PolicyViolation) as refused:
        t.cost.sum().release(epsilon=0.1)
    assert refused.value.rule == "privacy.budget"


def test_value_counts_come_back_noisy_shaped_as_pandas_shapes_them(hospital_owner: Any, kernel: Connect) -> None:
    kernel()
    frame = hospital_owner.frame
    t = cn.open("admissions")
    counts = t.diagnosis.value_counts().release(epsilon=0.2)
    truth = frame.diagnosis.value_counts()
    assert sorted(counts.index) == sorted(truth.index) and counts.name == truth.name
    assert list(counts) == sorted(counts, reverse=True)  # largest first, as pandas orders them
    (noise,) = counts.attrs["confnb_dp"]["noise"]
    assert float((counts - truth).abs().max()) < 3 * noise["interval_95"]
    assert not all(float(counts[k]) == float(truth[k]) for k in truth.index)  # noisy, not exact


@pytest.mark.parametrize(
    "dp_owner", [DP_POLICY.replace("never_release = [", "max_rows = 3\nnever_release = [")], indirect=True
)
def test_max_rows_holds_for_noisy_releases_and_refuses_before_spending(kernel: Connect) -> None:
    kernel()
    t = cn.open("admissions")
    with pytest.raises(cn.PolicyViolation) as refused:  # six public diagnoses: six rows, more than 3
        t.group_by("diagnosis").cost.mean().release(epsilon=0.3)
    assert refused.value.rule == "release.max_rows"
    assert cn.budget(t)["admissions"]["epsilon_spent"] == 0  # refused before the charge
    by_sex = t.group_by("sex").cost.mean().release(epsilon=0.3)  # the twin: two groups (threshold-chosen)
    assert len(by_sex) <= 2 and cn.budget(t)["admissions"]["epsilon_spent"] == pytest.approx(0.3)


# -- models ----------------------------------------------------------------------------------------------------------


def _spent(t: Any) -> float:
    return float(cn.budget(t)["admissions"]["epsilon_spent"])


def test_a_dp_model_is_charged_and_releases_only_what_its_mechanisms_produced(
    hospital_owner: Any, kernel: Connect, tmp_path: Path
) -> None:
    import pandas as pd
    from diffprivlib.models import LinearRegression  # type: ignore[import-untyped]

    vault = kernel()
    t = cn.open("admissions")
    m = cn.fit(LinearRegression(epsilon=0.4), t, target="cost", features=["age", "length_of_stay"])
    assert m.dp is not None and m.dp["epsilon"] == pytest.approx(0.4)
    assert m.dp["epsilon_remaining"] == {"admissions": pytest.approx(BUDGET - 0.4)}
    assert "differentially private" in repr(m) and _spent(t) == pytest.approx(0.4)
    released = m.params()
    assert set(released) == {"estimator", "features", "epsilon", "coef_", "intercept_"}
    assert set(released["coef_"]) == {"age", "length_of_stay"}
    for exact in (m.metrics, m.score):  # computed on the sealed rows: exact, refused
        with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):
            exact()
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):
        cn.export(m, tmp_path / "model.skops")
    assert not (tmp_path / "model.skops").exists()
    predictions = m.predict(pd.DataFrame({"age": [40, 40], "length_of_stay": [2.0, 20.0]}))  # post-processing
    assert predictions.shape == (2,) and np.isfinite(predictions).all()
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.budget"):  # more than is left: refused, nothing fitted
        cn.fit(LinearRegression(epsilon=0.7), t, target="cost", features=["age"])
    assert _spent(t) == pytest.approx(0.4)
    charges = [e["fields"] for e in vault.audit.entries() if e["event"] == "budget-charge"]
    fits = [e["fields"] for e in vault.audit.entries() if e["event"] == "fit"]
    assert len(charges) == 1 and charges[0]["plan_digest"] == fits[0]["operation"]


def test_a_model_fitted_to_one_record_gives_noise_never_its_value(hospital_owner: Any, kernel: Connect) -> None:
    """Exact mode's attack (a model of one patient: its prediction at their age is their bill) under DP: ten fits of
    one patient's row, each at ε = 0.1; none comes near the bill, and their spread is the noise's, not the data's."""
    from diffprivlib.models import LinearRegression

    kernel()
    target = hospital_owner.frame.iloc[1234]
    t = cn.open("admissions")
    one = t[t.patient_id == int(target.patient_id)]
    recovered = []
    for _ in range(10):
        released = cn.fit(LinearRegression(epsilon=0.1), one, target="cost", features=["age"]).params()
        recovered.append(released["intercept_"] + released["coef_"]["age"] * float(target.age))
    secret = float(target.cost)
    assert all(abs(value - secret) > 1.0 for value in recovered), (recovered, secret)
    assert float(np.std(recovered)) > 100.0  # noise, scaled to the public bounds, not to one record
    assert _spent(t) == pytest.approx(1.0)


def test_a_fixed_seed_or_the_analysts_own_bounds_are_refused_before_anything_is_spent(kernel: Connect) -> None:
    from diffprivlib.models import GaussianNB, LinearRegression, LogisticRegression

    kernel()
    t = cn.open("admissions")
    # A seed would let two fits cancel their noise; the analyst's own bounds may only narrow the owner's.
    for estimator, word in (
        (LinearRegression(epsilon=0.1, random_state=0), "random_state"),
        (LinearRegression(epsilon=0.1, bounds_X=([200], [300]), bounds_y=(0, 1)), "no range"),
    ):
        with pytest.raises(cn.VaultError, match=word):
            cn.fit(estimator, t, target="cost", features=["age"])
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.bounds"):  # no public bounds for a feature
        cn.fit(LinearRegression(epsilon=0.1), t, target="cost", features=["age", "readmitted"])
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.keys"):  # a classifier's classes must be public
        cn.fit(LogisticRegression(epsilon=0.1), t, target="readmitted", features=["age"])
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):  # its class counts sum to the exact rows
        cn.fit(GaussianNB(epsilon=0.1), t, target="sex", features=["age"])
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):  # a window: a row would hold other records
        cn.fit(
            LinearRegression(epsilon=0.1),
            t.assign(m=t.cost.transform("mean").over("sex")),
            target="m",
            features=["age"],
        )
    assert _spent(t) == 0
    # The twin: the same fit without seed twice; two different noises (never one stream replayed by a worker).
    first = cn.fit(LinearRegression(epsilon=0.1), t, target="cost", features=["age"]).params()
    second = cn.fit(LinearRegression(epsilon=0.1), t, target="cost", features=["age"]).params()
    assert first["coef_"]["age"] != second["coef_"]["age"]
    assert _spent(t) == pytest.approx(0.2)


def test_a_dp_classifier_and_clusters_name_only_public_values(kernel: Connect) -> None:
    import pandas as pd
    from diffprivlib.models import KMeans, LogisticRegression

    kernel()
    t = cn.open("admissions")
    classifier = cn.fit(LogisticRegression(epsilon=0.3), t, target="sex", features=["age", "cost"])
    assert classifier.params()["classes_"] == ["F", "M"]  # the owner's keys, whatever the rows hold
    predicted = classifier.predict(pd.DataFrame({"age": [30, 80], "cost": [2000.0, 9000.0]}))
    assert set(predicted.tolist()) <= {"F", "M"}
    # Patients of one diagnosis only: the classes are still the public pair, so the answer tells nothing of which.
    narrowed = cn.fit(LogisticRegression(epsilon=0.3), t[t.sex == "F"], target="sex", features=["age", "cost"])
    assert narrowed.params()["classes_"] == ["F", "M"]
    clusters = cn.fit(KMeans(n_clusters=3, epsilon=0.3), t, features=["age", "cost"]).params()
    centres = np.array([[c["age"], c["cost"]] for c in clusters["cluster_centers_"]])
    assert centres.shape == (3, 2) and (centres >= [0, 0]).all() and (centres <= [120, 40000]).all()
    assert _spent(t) == pytest.approx(0.9)


@pytest.mark.parametrize("dp_owner", [DP_POLICY.replace("epsilon = 1.0\n", "epsilon = 10.0\n")], indirect=True)
def test_a_dp_regression_with_budget_to_spare_finds_the_relationship(kernel: Connect) -> None:
    """The twin of the attacks: on all 4,000 patients at ε = 5 the cost per day in hospital (910 in the data) comes
    back close, and so do predictions."""
    import pandas as pd
    from diffprivlib.models import LinearRegression

    kernel()
    t = cn.open("admissions")
    m = cn.fit(LinearRegression(epsilon=5.0), t, target="cost", features=["age", "length_of_stay"])
    per_day = m.params()["coef_"]["length_of_stay"]
    assert 400 < per_day < 1500, per_day
    short, long = m.predict(pd.DataFrame({"age": [50, 50], "length_of_stay": [2.0, 20.0]}))
    assert long - short > 5000


def test_describe_comes_back_noisy_with_what_dp_can_say_of_each_column(hospital_owner: Any, kernel: Connect) -> None:
    kernel()
    frame = hospital_owner.frame
    t = cn.open("admissions")
    described = t[["age", "length_of_stay"]].describe().release(epsilon=0.5)
    assert list(described.index) == ["count", "mean", "25%", "50%", "75%"]
    assert list(described.columns) == ["age", "length_of_stay"]
    truth = frame[["age", "length_of_stay"]].describe()
    account = described.attrs["confnb_dp"]
    interval = {item["column"]: item["interval_95"] for item in account["noise"]}
    for column in ("age", "length_of_stay"):
        for statistic in ("count", "mean"):  # within 3x their stated 95% intervals: noisy, and close
            error = abs(described.loc[statistic, column] - truth.loc[statistic, column])
            assert error < 3 * interval[f"{column} {statistic}"], (column, statistic, error)
        assert not np.isclose(described.loc["mean", column], truth.loc["mean", column], rtol=0, atol=1e-9)
    assert account["epsilon"] == pytest.approx(0.5)
    assert {item["column"] for item in account["noise"]} >= {"age count", "age mean", "length_of_stay 50%"}
    # Every bounded numeric column when none is named; a column without public bounds is refused by name.
    assert set(t.describe().release(epsilon=0.2).columns) == {"age", "length_of_stay", "cost"}
    with pytest.raises(cn.VaultError, match=r"no bounds for 'readmitted' \(privacy\.bounds\.readmitted\)"):
        t.describe(["age", "readmitted"]).release(epsilon=0.1)
    assert _spent(t) == pytest.approx(0.7)


def test_after_a_filter_groups_with_public_keys_come_back_and_others_are_refused(
    hospital_owner: Any, kernel: Connect
) -> None:
    kernel()
    frame = hospital_owner.frame
    t = cn.open("admissions")
    older = t[t.age >= 60]
    by_diagnosis = older.group_by("diagnosis").cost.mean().release(epsilon=0.5)  # public keys: released
    truth = frame[frame.age >= 60].groupby("diagnosis").cost.mean()
    assert sorted(by_diagnosis.index) == sorted(truth.index)
    (noise,) = by_diagnosis.attrs["confnb_dp"]["noise"]
    error = (by_diagnosis.sort_index() - truth.sort_index()).abs()
    assert float(error.max()) < 3 * noise["interval_95"]
    with pytest.raises(cn.VaultError, match="public keys"):  # age bands have no public keys: refused, unpaid
        older.assign(band=older.age // 10).group_by("band").cost.mean().release(epsilon=0.5)
    assert _spent(t) == pytest.approx(0.5)


BILLS_POLICY = """
[policy]
id = "bills-dp-v1"
[release]
allow = ["schema", "aggregate"]
never_release = ["patient_id"]
[privacy]
mode = "dp"
epsilon = 2.0
unit = "patient_id"
max_contributions = 1
[privacy.bounds]
copay = [0.0, 500.0]
[privacy.keys]
insurer = ["A", "B"]
"""


@pytest.fixture
def insurer(hospital_owner: Any, dp_owner: Owner, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A second owner, an insurer with its own broker, holding one bill for every other admitted patient."""
    import pandas as pd

    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    patients = hospital_owner.frame.patient_id.to_numpy()[::2]
    rng = np.random.default_rng(11)
    bills = pd.DataFrame(
        {
            "patient_id": patients,
            "insurer": rng.choice(["A", "B"], patients.size),
            "copay": np.round(rng.uniform(0, 400, patients.size), 2),
        }
    )
    store = OwnerStore.create(tmp_path / "insurer")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    policy = OutputPolicy.from_toml(BILLS_POLICY)
    encrypt_dataset(bills, dp_owner.datasets / "bills", store, "bills", policy, attestation)
    with serve_locally(store) as url:
        yield url, bills


def test_a_join_of_two_owners_is_released_noisy_and_charged_to_both(
    hospital_owner: Any, kernel: Connect, insurer: tuple[str, Any]
) -> None:
    url, bills = insurer
    vault = kernel()
    t = cn.open("admissions")
    b = cn.open("bills", broker=url)
    joined = t.merge(b, on="patient_id")
    by_insurer = joined.group_by("insurer").agg(cost=("cost", "mean"), copay=("copay", "mean")).release(epsilon=0.5)
    truth = hospital_owner.frame.merge(bills, on="patient_id").groupby("insurer")[["cost", "copay"]].mean()
    assert sorted(by_insurer.index) == ["A", "B"]
    for column in ("cost", "copay"):
        (noise,) = [item for item in by_insurer.attrs["confnb_dp"]["noise"] if item["column"] == column]
        error = (by_insurer[column].sort_index() - truth[column].sort_index()).abs()
        assert float(error.max()) < 3 * noise["interval_95"]
    assert cn.budget(t)["admissions"]["epsilon_spent"] == pytest.approx(0.5)
    assert cn.budget(b)["bills"]["epsilon_spent"] == pytest.approx(0.5)
    charged = sorted(e["fields"]["dataset"] for e in vault.audit.entries() if e["event"] == "budget-charge")
    assert charged == ["admissions", "bills"]
    with pytest.raises(cn.PolicyViolation, match=r"privacy\.mode"):  # exact, even joined: refused
        joined.group_by("insurer").agg(copay=("copay", "mean")).release()
