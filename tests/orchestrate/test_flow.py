"""The whole pipeline as one Prefect flow (ephemeral API), on the tiny model."""
from __future__ import annotations

from tuneops import log, stages
from tuneops.io import read_json


def test_prefect_flow_runs_every_stage_and_registers_a_champion(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    root, state, _ = flow_run
    assert state.is_completed(), state
    result = state.result()
    assert tuple(result) == (*stages.STAGE_NAMES, "resources")     # the stages in order, then their usage
    usage = result["resources"]
    assert tuple(usage) == (*stages.STAGE_NAMES, "total")
    assert all(u["wall_s"] >= 0 for u in usage.values()) and usage["total"]["wall_s"] >= usage["train"]["wall_s"]
    peaks = [u["peak_rss_bytes"] for name, u in usage.items() if name != "total" and u["peak_rss_bytes"]]
    assert usage["total"]["peak_rss_bytes"] == max(peaks, default=None)
    print("\n" + log.resources_table(usage))
    assert result["evaluate"]["finetuned_perplexity"] < result["evaluate"]["base_perplexity"]
    assert result["optimize"]["variants"]["fp32"]["max_abs_logits_diff"] <= 1e-3
    assert result["register"]["alias"] == "champion"

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert sorted(t.name for t in task_runs) == sorted(stages.STAGE_NAMES)
    assert all(t.state.is_completed() for t in task_runs)
    # the MLflow run and the registered version point back to this flow run
    registration = read_json(root / "artifacts" / "register" / "registration.json")
    assert registration["tags"]["prefect.flow_run_id"] == str(flow_run_id)
