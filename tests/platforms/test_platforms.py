"""`tuneops export kaito|azureml`: the planner's plans (real planner, model configs from
tests/fixtures) as a Kaito Workspace + ConfigMap checked against Kaito's CRD schema, and as Azure
ML jobs checked by the Azure ML SDK's own loader; plans a platform cannot express are refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project

CONFIGS = Path(__file__).parents[1] / "fixtures" / "model_configs"
REPO = Path(__file__).resolve().parents[2]


def _plan(model: str, method: str, gpus: int = 1, mem: float = 80.0, nodes: int = 1, **goals) -> dict:
    from tuneops.planner import Goals, Hardware, ModelSpec, make_plan

    hw = Hardware(gpus=gpus, gpu_memory_gb=mem, host_ram_gb=512.0, nodes=nodes, cpu_cores=32)
    allowed = ("full", "lora", "qlora", "dora")
    return make_plan(ModelSpec.from_path(CONFIGS / f"{model}.json"), hw, 1024,
                     Goals(method=method, allowed_methods=allowed, **goals)).to_dict()


@pytest.fixture(scope="module")
def project() -> Path:
    root = make_project("platforms")
    data = root / "artifacts" / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(5)))
    return root


def _export(root: Path, platform: str, plan: dict) -> tuple[int, dict | None, str]:
    (root / "artifacts" / "select").mkdir(parents=True, exist_ok=True)
    (root / "artifacts" / "select" / "plan.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-m", "tuneops", "export", platform], cwd=root, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else None), r.stderr


def _kaito_docs(out: dict) -> tuple[dict, dict, dict]:
    configmap, ws = yaml.safe_load_all(Path(out["files"][0]).read_text())
    return configmap, ws, yaml.safe_load(configmap["data"]["training_config.yaml"])["training_config"]


def _crd_schema() -> dict:
    from tuneops.platforms import kaito

    return kaito._strict(yaml.safe_load(kaito.SCHEMA.read_text()))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_kaito_workspace_validates_against_the_crd(project, method):
    import jsonschema

    plan = _plan("phi-3-mini", method)
    rc, out, err = _export(project, "kaito", plan)
    assert rc == 0, err
    configmap, ws, tc = _kaito_docs(out)
    jsonschema.validate(ws, _crd_schema())                      # Kaito's own CRD schema, strict
    assert ws["apiVersion"] == "kaito.sh/v1beta1" and ws["kind"] == "Workspace"
    assert ws["resource"]["instanceType"] == "Standard_NC24ads_A100_v4"     # platforms.kaito.instance_type
    t = ws["tuning"]
    assert (t["method"], t["preset"]["name"], t["config"]) == (method, "phi-3-mini-4k-instruct",
                                                               configmap["metadata"]["name"])
    assert t["input"] == {"volumeSource": {"persistentVolumeClaim": {"claimName": "tuneops-data"}}}
    assert set(tc) == {"ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator",
                       "DatasetConfig"}
    assert tc["QuantizationConfig"]["load_in_4bit"] is (method == "qlora")
    assert tc["LoraConfig"]["r"] == plan["peft"]["r"] and tc["LoraConfig"]["lora_alpha"] == plan["peft"]["alpha"]
    assert tc["TrainingArguments"]["per_device_train_batch_size"] == plan["micro_batch_size"]
    assert tc["TrainingArguments"]["gradient_accumulation_steps"] == plan["grad_accum"]


def test_kaito_schema_catches_what_kaito_would_reject():
    """The check is real: a misspelt field or a missing required one fails the vendored schema."""
    import jsonschema

    from tuneops.platforms import kaito

    good = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "x"},
            "resource": {"instanceType": "a", "labelSelector": {"matchLabels": {"apps": "x"}}},
            "tuning": {"preset": {"name": "p"}, "method": "lora", "input": {"urls": ["https://h/d.jsonl"]},
                       "output": {"image": "r/a:1"}}}
    kaito.validate(good)
    for bad in ({**good, "resource": {"instanceType": "a"}},                          # labelSelector required
                {**good, "tuning": {**good["tuning"], "inputs": good["tuning"]["input"]}},   # unknown field
                {**good, "tuning": {k: v for k, v in good["tuning"].items() if k != "output"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, _crd_schema())
        with pytest.raises(kaito.PlatformError, match="CRD schema"):
            kaito.validate(bad)
    with pytest.raises(kaito.PlatformError, match="exactly one of urls, image, volumeSource"):
        kaito.validate({**good, "tuning": {**good["tuning"], "input": {"urls": ["u"], "image": "i"}}})


@pytest.mark.parametrize("method,goals,rule", [
    ("full", {}, "lora or qlora only"),
    ("dora", {}, "DoRA"),
    ("lora", {"zero_stage": 3, "offload": "optimizer+params"}, "offload"),
])
def test_kaito_refuses_what_it_cannot_express(project, method, goals, rule):
    plan = _plan("phi-3-mini", method, **goals)
    rc, _, err = _export(project, "kaito", plan)
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("tuneops: error: export kaito:") and rule in line, line


@pytest.mark.parametrize("model,method,gpus,nodes", [("phi-3-mini", "lora", 1, 1), ("llama-2-7b", "full", 8, 2)])
def test_azureml_jobs_load_with_the_sdk(project, model, method, gpus, nodes):
    from azure.ai.ml import load_job

    plan = _plan(model, method, gpus=gpus, nodes=nodes)
    assert (plan["nproc_per_node"], plan["nodes"]) == (gpus, nodes)
    rc, out, err = _export(project, "azureml", plan)
    assert rc == 0, err
    job = load_job(source=out["files"][0])                 # the SDK's own schema, offline
    assert job.type == "command"
    assert job.distribution.process_count_per_instance == plan["nproc_per_node"]
    assert job.resources.instance_count == plan["nodes"]
    assert job.environment.image == "tuneops:latest"
    assert {k: v.type for k, v in job.inputs.items()} == {"train_data": "uri_file", "plan": "uri_file",
                                                          "params": "uri_file"}
    assert job.outputs["model"].type == "mlflow_model"
    from tuneops.io import md5_file

    assert job.tags["tuneops.md5.train_data"] == md5_file(project / "artifacts" / "data" / "train.jsonl")
    assert "python -m tuneops.training.launch" in job.command
    if method == "lora":
        ft = load_job(source=out["files"][1])
        assert ft.type == "finetuning" and ft.hyperparameters["lora_r"] == str(plan["peft"]["r"])
    else:                                               # managed fine-tuning trains LoRA only
        assert len(out["files"]) == 1 and "LoRA" in out["finetuning"]


def test_deploy_image_on_a_docker_pool(project):
    """`tuneops deploy --image` on a Docker work pool (real Prefect API, ephemeral server; the pool
    gets Prefect's own default Docker job template): both deployments run the image's /app code,
    with the params' job variables; a process pool, which cannot run images, is refused."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from tuneops.config import load_config
    from tuneops.errors import TuneopsError
    from tuneops.orchestrate.deploy import deploy

    template = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "work-pool", "get-default-base-job-template", "--type", "docker"],
        capture_output=True, text=True, check=True, env=os.environ).stdout)
    assert "image" in template["variables"]["properties"]
    with get_client(sync_client=True) as client:
        for name, kw in (("test-docker", {"type": "docker", "base_job_template": template}),
                         ("test-process", {"type": "process"})):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, **kw))
    cfg = load_config(project / "params.yaml", ["orchestrate.work_pool=test-docker"])
    out = deploy(cfg, project / "params.yaml", ["train.max_steps=5"], image="registry.example/tuneops:1.0")
    assert out["params_file"] == "/app/params.yaml" and out["work_pool"]["type"] == "docker"
    with get_client(sync_client=True) as client:
        for dep in out["deployments"].values():
            d = client.read_deployment(dep["id"])
            assert (d.path, d.work_pool_name) == ("/app", "test-docker")
            assert d.job_variables["image"] == "registry.example/tuneops:1.0"
            assert d.job_variables["env"] == {"TUNEOPS_DVC_PULL": "1"}          # platforms.job_variables
            assert d.parameters["overrides"] == ["train.max_steps=5"]
    with pytest.raises(TuneopsError, match="process pool, which runs no images"):
        deploy(load_config(project / "params.yaml", ["orchestrate.work_pool=test-process"]),
               project / "params.yaml", image="tuneops:latest")
    # a pool that does not exist yet becomes a Docker pool with Prefect's default template
    out = deploy(load_config(project / "params.yaml", ["orchestrate.work_pool=test-new-docker"]),
                 project / "params.yaml", image="tuneops:latest")
    assert out["work_pool"]["type"] == "docker"
