"""infra/k8s/: every overlay renders, its RayJob validates against KubeRay's CRD schema, and the
invariants of a safe run hold (non-root pods, a service account, a TTL, token auth, weights that
are mounted where they are used and checked before the job starts, pinned images, rayVersion ==
the locked ray).

The CRD schemas are copies of KubeRay's (infra/k8s/schemas/SOURCE.md). Unknown fields are errors
here (the API server would silently prune them), as with `kubectl apply --validate=strict`."""
from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from kustomize_lite import load_docs, render, split_image

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
LOCK = REPO / "infra" / "lock-cuda.txt"  # the image's versions
SECRETS = K8S / "secrets.example.yaml"
REQUIRED_OVERLAYS = {"tiny-cpu", "eostok-h-4x8"}
APP = "/app"  # the image's WORKDIR: paths under it come with the image
WEIGHTS_ROOT = "/models"
BASE_IMAGE_NAME = "tokenizer-ar"  # the base's placeholder, replaced by each overlay's `images:`
CHECK_SCRIPT = f"{APP}/infra/check_weights.py"


def overlays() -> list[Path]:
    root = K8S / "overlays"
    return sorted(p for p in root.iterdir() if (p / "kustomization.yaml").is_file()) if root.is_dir() else []


def targets() -> list[Path]:
    """What to render: each overlay, and the optional weights kustomization."""
    out = overlays()
    if (K8S / "weights" / "kustomization.yaml").is_file():
        out.append(K8S / "weights")
    return out


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(K8S)) for p in paths]


@lru_cache(maxsize=None)
def rendered(folder: Path) -> tuple[dict, ...]:
    return tuple(render(folder))


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def locked_version(name: str) -> str:
    for line in LOCK.read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==([^\s;#]+)", line.strip(), re.IGNORECASE)
        if m:
            return m.group(1)
    raise AssertionError(f"{LOCK} pins no {name}")


# --- schemas -------------------------------------------------------------------------------------

def _strict(schema):
    """Copy of an openAPIV3Schema as the API server applies it: objects with listed properties reject
    unknown fields, and a required field with a default may be left out (the server fills it in)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    props = schema.get("properties")
    if props is not None and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if props is not None and "required" in schema:
        out["required"] = [r for r in schema["required"] if "default" not in props.get(r, {})]
    return out


@lru_cache(maxsize=None)
def validator(kind: str) -> jsonschema.Draft7Validator:
    files = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    with open(SCHEMAS / files[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def test_schema_copies_are_kuberay_crds():
    source = (SCHEMAS / "SOURCE.md").read_text()
    assert "ray-project/kuberay" in source and "v1.7.0" in source
    for kind in ("RayJob", "RayCluster"):
        validator(kind)


def test_strict_schema_catches_unknown_and_wrong_fields():
    """The validator itself: a typo'd field and a wrong type are errors."""
    good = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
            "spec": {"entrypoint": "python x.py", "ttlSecondsAfterFinished": 60}}
    assert not list(validator("RayJob").iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["ttlSecondAfterFinished"] = typo["spec"].pop("ttlSecondsAfterFinished")
    assert list(validator("RayJob").iter_errors(typo))
    wrong = copy.deepcopy(good)
    wrong["spec"]["backoffLimit"] = "three"
    assert list(validator("RayJob").iter_errors(wrong))


# --- rendering -----------------------------------------------------------------------------------

def test_required_overlays_exist():
    names = {p.name for p in overlays()}
    assert REQUIRED_OVERLAYS <= names, f"infra/k8s/overlays/ has {sorted(names)}; expected at least {sorted(REQUIRED_OVERLAYS)}"
    assert (K8S / "base" / "kustomization.yaml").is_file()


@pytest.mark.parametrize("folder", targets(), ids=ids(targets()))
def test_renders_as_kubectl_kustomize_does(folder):
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    cmd = [tool, "build", str(folder)] if tool.endswith("kustomize") else [tool, "kustomize", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(d):
        return (d["kind"], d["metadata"]["name"])

    assert sorted(theirs, key=key) == sorted(rendered(folder), key=key)


def test_secret_template_is_not_rendered():
    """The placeholder secrets are a template: applying an overlay must never overwrite real ones."""
    for folder in targets():
        assert not of_kind(rendered(folder), "Secret"), f"{folder} renders a Secret"


# --- pod templates -------------------------------------------------------------------------------

def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayJob / RayCluster / Job document."""
    kind, spec = doc["kind"], doc.get("spec", {})
    out = []
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            out.append(("submitter", spec["submitterPodTemplate"]))
        spec = spec.get("rayClusterSpec", {})
        kind = "RayCluster"
    if kind == "RayCluster":
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [(f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    elif kind in ("Job", "Pod"):
        out.append(("pod", spec["template"] if kind == "Job" else doc))
    return out


def ray_containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, the Ray container) of head and workers: the first container, which KubeRay
    treats as the Ray container (it injects RAY_AUTH_TOKEN there)."""
    return [(w, t["spec"], t["spec"]["containers"][0]) for w, t in pod_templates(doc) if w != "submitter"]


def workloads(folder: Path) -> list[dict]:
    return [d for d in rendered(folder) if d["kind"] in ("RayJob", "RayCluster", "Job", "Pod")]


def rayjob(folder: Path) -> dict:
    (job,) = of_kind(rendered(folder), "RayJob")
    return job


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_rayjob_validates_against_kuberay_schema(folder):
    docs = [d for d in rendered(folder) if d["kind"] in ("RayJob", "RayCluster")]
    assert docs, f"{folder} renders no RayJob / RayCluster"
    for d in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(d["kind"]).iter_errors(d)]
        assert not errors, f"{d['kind']} {d['metadata']['name']}:\n" + "\n".join(errors[:20])


@pytest.mark.parametrize("folder", targets(), ids=ids(targets()))
def test_every_container_runs_non_root_without_privilege_escalation(folder):
    problems = []
    for doc in workloads(folder):
        for where, tmpl in pod_templates(doc):
            spec = tmpl["spec"]
            psc = spec.get("securityContext") or {}
            name = f"{doc['kind']} {doc['metadata']['name']} {where}"
            if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 1000 or psc.get("fsGroup") is None:
                problems.append(f"{name}: pod securityContext needs runAsNonRoot: true, runAsUser: 1000, fsGroup (has {psc})")
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                sc = c.get("securityContext") or {}
                if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged") \
                        or sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
                    problems.append(f"{name} container {c['name']}: securityContext needs allowPrivilegeEscalation: false, "
                                    f"no privilege, no root (has {sc})")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{name} container {c['name']}: capabilities.drop should be [ALL]")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("folder", targets(), ids=ids(targets()))
def test_every_pod_has_a_rendered_service_account(folder):
    accounts = {d["metadata"]["name"] for d in of_kind(rendered(folder), "ServiceAccount")}
    for doc in workloads(folder):
        for where, tmpl in pod_templates(doc):
            sa = tmpl["spec"].get("serviceAccountName")
            assert sa, f"{doc['kind']} {doc['metadata']['name']} {where}: no serviceAccountName"
            assert sa in accounts, f"{where}: serviceAccountName {sa!r} is not rendered by {folder} (has {sorted(accounts)})"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_rayjob_lifecycle(folder):
    """A failed job does not recreate the cluster; the finished cluster is kept a while for its logs;
    the submitter pod is ours (non-root, service account) rather than KubeRay's default."""
    spec = rayjob(folder)["spec"]
    assert spec.get("backoffLimit") == 0, "backoffLimit must be 0: each retry recreates the whole cluster"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("ttlSecondsAfterFinished", 0) > 0, "ttlSecondsAfterFinished keeps the cluster (and its logs) after the job"
    assert "submitterPodTemplate" in spec
    assert spec.get("preRunningDeadlineSeconds", 0) > 0, "a cluster that never starts (no GPUs, bad secret) must fail, not hang"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_token_auth_and_its_secret_in_the_template(folder):
    cluster = rayjob(folder)["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token", "Ray dashboard / job API must require a token (authOptions.mode: token)"
    assert auth.get("secretName") in secret_template(), "the token's Secret must be listed in secrets.example.yaml"
    assert "auth_token" in secret_template()[auth["secretName"]], "KubeRay reads the token from the key auth_token"
    for where, spec, c in ray_containers(rayjob(folder)):
        assert c["name"] in ("ray-head", "ray-worker"), f"{where}: the Ray container must come first (KubeRay injects the token there)"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_ray_containers_have_requests_and_limits(folder):
    for where, spec, c in ray_containers(rayjob(folder)):
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part) or {})
            assert not missing, f"{where}: resources.{part} lacks {sorted(missing)}"


@lru_cache(maxsize=None)
def secret_template() -> dict[str, set[str]]:
    out = {}
    for d in load_docs(SECRETS):
        assert d["kind"] == "Secret"
        out[d["metadata"]["name"]] = set(d.get("stringData") or {}) | set(d.get("data") or {})
    return out


@pytest.mark.parametrize("folder", targets(), ids=ids(targets()))
def test_referenced_secret_keys_are_in_the_template(folder):
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secretRef" in node and "name" in node["secretRef"]:
                refs.append((node["secretRef"]["name"], None))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(list(rendered(folder)))
    assert refs, f"{folder} uses no credentials Secret"
    template = secret_template()
    for name, key in refs:
        assert name in template, f"Secret {name!r} is used but not in {SECRETS.name}"
        assert key is None or key in template[name], f"key {key!r} of Secret {name!r} is used but not in {SECRETS.name}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"):
        assert any(key in keys for keys in template.values()), f"{SECRETS.name} lists no {key}"


# --- images and versions -------------------------------------------------------------------------

@pytest.mark.parametrize("folder", targets(), ids=ids(targets()))
def test_images_are_pinned_by_the_overlay(folder):
    for doc in workloads(folder):
        for where, tmpl in pod_templates(doc):
            for c in tmpl["spec"].get("initContainers", []) + tmpl["spec"]["containers"]:
                name, tag, digest = split_image(c["image"])
                assert name != BASE_IMAGE_NAME, f"{where} {c['name']}: image {c['image']!r} is the base's placeholder; set it with `images:` in the overlay"
                assert (digest and re.fullmatch(r"sha256:[0-9a-f]{64}", digest)) or (tag and tag != "latest"), \
                    f"{where} {c['name']}: image {c['image']!r} is pinned by neither digest nor a fixed tag"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_ray_version_is_the_locked_one(folder):
    assert rayjob(folder)["spec"]["rayClusterSpec"]["rayVersion"] == locked_version("ray")


# --- weights and the run config ------------------------------------------------------------------

def entrypoint_parts(job: dict) -> tuple[list[str] | None, list[str]]:
    """(the check script's argv, the job's argv) of `python CHECK ... -- python JOB ...`; (None,
    the whole command) for an entrypoint without the check."""
    argv = shlex.split(job["spec"]["entrypoint"])
    if argv[:2] != ["python", CHECK_SCRIPT] or "--" not in argv:
        return None, argv
    cut = argv.index("--")
    return argv[2:cut], argv[cut + 1:]


def mounted_configs(folder: Path, job: dict) -> dict[str, str]:
    """{file path in the head container: text} for ConfigMap volumes mounted into the head."""
    (_, head_spec, head), *_ = ray_containers(job)
    maps = {d["metadata"]["name"]: d for d in of_kind(rendered(folder), "ConfigMap")}
    volumes = {v["name"]: v for v in head_spec.get("volumes", [])}
    out = {}
    for m in head.get("volumeMounts", []):
        vol = volumes.get(m["name"]) or {}
        if "configMap" in vol:
            cm = maps.get(vol["configMap"]["name"])
            assert cm is not None, f"ConfigMap {vol['configMap']['name']!r} is mounted but not rendered by {folder}"
            for key, text in cm["data"].items():
                out[str(PurePosixPath(m["mountPath"]) / key)] = text
    return out


def config_files(folder: Path, job: dict) -> list[tuple[str, dict]]:
    """(path in the container, parsed YAML) of the job's --config files."""
    _, job_argv = entrypoint_parts(job)
    mounted = mounted_configs(folder, job)
    out = []
    for i, a in enumerate(job_argv):
        if a == "--config":
            path = job_argv[i + 1]
            if path.startswith(APP + "/"):
                text = (REPO / path[len(APP) + 1:]).read_text()
            else:
                assert path in mounted, f"--config {path} is neither in the image ({APP}) nor a mounted ConfigMap key"
                text = mounted[path]
            out.append((path, yaml.safe_load(text) or {}))
    return out


def run_values(folder: Path, job: dict) -> dict:
    """The job's settings from its --config files and key=value arguments, merged (a flat dict)."""
    flat: dict = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    for _, tree in config_files(folder, job):
        walk(tree)
    _, job_argv = entrypoint_parts(job)
    for a in job_argv:
        if "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            flat[k] = yaml.safe_load(v)
    return flat


def mounted_at(spec: dict, container: dict, path: str) -> dict | None:
    """The pod volume mounted over `path` in `container` (None when nothing is)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and m["name"] in volumes:
            return volumes[m["name"]]
    return None


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_weight_paths_are_mounted_in_every_ray_container(folder):
    """Every local path the job reads (weights under /models) is on a volume mounted into the head
    (where the driver and the check run) and every worker (where the models load)."""
    job = rayjob(folder)
    used = sorted({v for v in run_values(folder, job).values()
                   if isinstance(v, str) and v.startswith("/") and not v.startswith(APP + "/")})
    text = yaml.safe_dump(job) + "".join(mounted_configs(folder, job).values())
    assert all(p in used for p in re.findall(rf"(?<![\w/]){WEIGHTS_ROOT}/[\w./-]+", text)), \
        f"a {WEIGHTS_ROOT} path is used outside the job's settings: {text}"
    for where, spec, c in ray_containers(job):
        for p in used:
            assert mounted_at(spec, c, p) is not None, f"{where}: {p} is used by the job but no volume is mounted there"
            m = next(m for m in c["volumeMounts"] if p.startswith(m["mountPath"].rstrip("/") + "/") or p == m["mountPath"])
            assert m.get("readOnly") is True, f"{where}: the weights mount {m['mountPath']} should be readOnly"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_entrypoint_checks_the_weights_before_the_job(folder):
    job = rayjob(folder)
    check_argv, job_argv = entrypoint_parts(job)
    assert check_argv is not None, \
        f"the entrypoint must be `python {CHECK_SCRIPT} [--root DIR] -- python JOB ...` (weights checked first): {job_argv[:4]}"
    assert (REPO / CHECK_SCRIPT[len(APP) + 1:]).is_file()
    assert job_argv[0] == "python" and job_argv[1].startswith(f"{APP}/jobs/")
    roots = [check_argv[i + 1] for i, a in enumerate(check_argv) if a == "--root"]
    assert roots == [WEIGHTS_ROOT] or not roots, f"the check looks under {roots}, the weights are under {WEIGHTS_ROOT}"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_run_config_is_a_valid_job_config(folder, tmp_path):
    """The job's own loader accepts the overlay's settings (no unknown key, right types): what the
    driver would say with exit 2 after the cluster is up is caught here instead."""
    job = rayjob(folder)
    _, job_argv = entrypoint_parts(job)
    local = {}
    for i, (path, _) in enumerate(config_files(folder, job)):
        if not path.startswith(APP + "/"):
            local[path] = tmp_path / f"config{i}.yaml"
            local[path].write_text(mounted_configs(folder, job)[path])
    argv = [str(local.get(a, REPO / a[len(APP) + 1:] if a.startswith(APP + "/") else a)) for a in job_argv[2:]]
    spec = importlib.util.spec_from_file_location(f"job_{folder.name.replace('-', '_')}", REPO / job_argv[1][len(APP) + 1:])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (schema,) = {v for k, v in vars(mod).items() if k.endswith("Experiment") and isinstance(v, type)}
    from system.config import load_config

    cfg = load_config(schema, argv, mod.DEFAULTS)
    assert cfg.checkpoint.storage_path.startswith("s3://"), "pods share no disk: checkpoints must go to object storage"
    assert cfg.data.url.startswith("s3://")
    assert cfg.cluster.address is None  # the driver joins the RayJob's cluster (RAY_ADDRESS)


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_worker_count_fits_the_cluster(folder):
    """cluster.num_workers (Ray Train ranks) is what the worker groups provide: one rank per GPU
    for a GPU run; at most the worker CPUs for a CPU run."""
    job = rayjob(folder)
    values = run_values(folder, job)
    assert "cluster.num_workers" in values, "the overlay's run config must set cluster.num_workers"
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]

    def per_pod(g, key):
        return int(g["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get(key, 0))

    gpus = sum(g["replicas"] * per_pod(g, "nvidia.com/gpu") for g in groups)
    cpus = sum(g["replicas"] * per_pod(g, "cpu") for g in groups)
    n = values["cluster.num_workers"]
    if gpus:
        assert n == gpus, f"cluster.num_workers={n} but the worker groups have {gpus} GPUs"
        assert values.get("cluster.device", "auto") in ("auto", "gpu")
    else:
        assert values.get("cluster.device") == "cpu", "a cluster without GPUs needs cluster.device=cpu"
        assert n * float(values.get("cluster.cpus_per_worker", 1)) <= cpus, f"{n} workers do not fit {cpus} worker CPUs"
    for g in groups:
        assert g.get("minReplicas", g["replicas"]) <= g["replicas"] <= g.get("maxReplicas", g["replicas"])


# --- scheduling, bounds, multi-node NCCL, identity -----------------------------------------------

CLUSTER_SETUP = K8S / "cluster-setup"
DOCKERFILE = REPO / "infra" / "Dockerfile"
INFRA_README = REPO / "infra" / "README.md"
# GPU feature discovery's nvidia.com/gpu.product values -> compute capability (flash-attn's archs)
GPU_ARCH = {"NVIDIA-A100-SXM4-40GB": "80", "NVIDIA-A100-SXM4-80GB": "80", "NVIDIA-A100-PCIE-80GB": "80",
            "NVIDIA-H100-80GB-HBM3": "90", "NVIDIA-H100-PCIe": "90", "NVIDIA-H200": "90"}
RDMA_RESOURCES = ("vpc.amazonaws.com/efa", "rdma/")


def gpu_groups(job: dict) -> list[dict]:
    return [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            if int(g["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))]


def test_cluster_setup_renders_as_kubectl_kustomize_does():
    kinds = sorted(d["kind"] for d in rendered(CLUSTER_SETUP))
    assert kinds == ["ClusterQueue", "PriorityClass", "ResourceFlavor"]
    test_renders_as_kubectl_kustomize_does(CLUSTER_SETUP)


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_head_and_workers_have_dev_shm(folder):
    """Ray's object store, DataLoader workers and NCCL use /dev/shm: a memory-backed volume there
    (the container runtime's default is 64 MiB)."""
    for where, spec, c in ray_containers(rayjob(folder)):
        vol = mounted_at(spec, c, "/dev/shm")
        assert vol is not None and vol.get("emptyDir", {}).get("medium") == "Memory", f"{where}: no /dev/shm"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_a_hung_job_is_bounded_and_a_preempted_rank_can_commit(folder):
    spec = rayjob(folder)["spec"]
    assert spec.get("activeDeadlineSeconds", 0) > spec["preRunningDeadlineSeconds"], "a hung job must end"
    for where, pod, c in ray_containers(rayjob(folder)):
        grace = pod.get("terminationGracePeriodSeconds", 30)
        assert grace >= 120, f"{where}: {grace} s after SIGTERM is too short for a step and a checkpoint commit"
    for g in gpu_groups(rayjob(folder)):
        assert g["template"]["spec"]["terminationGracePeriodSeconds"] >= 300, \
            "a GPU rank commits its ZeRO partition (~0.7 GB for EOSTok-H on 32 ranks) before it exits"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_gpu_workers_select_a_gpu_type_the_image_has_kernels_for(folder):
    (archs,) = re.findall(r'^ARG FLASH_ATTN_CUDA_ARCHS="?([^"\n]+)"?$', DOCKERFILE.read_text(), re.M)
    for g in gpu_groups(rayjob(folder)):
        product = (g["template"]["spec"].get("nodeSelector") or {}).get("nvidia.com/gpu.product")
        assert product in GPU_ARCH, f"{folder.name}: GPU workers need a nodeSelector nvidia.com/gpu.product (one of {sorted(GPU_ARCH)})"
        assert GPU_ARCH[product] in archs.split(";"), f"flash-attn is built for {archs}, {product} is {GPU_ARCH[product]}"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_multi_node_nccl_settings_are_set_and_documented(folder):
    readme = INFRA_README.read_text()
    for g in gpu_groups(rayjob(folder)):
        env = {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0].get("env", [])}
        if g["replicas"] > 1:
            assert "NCCL_SOCKET_IFNAME" in env, "NCCL between nodes needs the pods' interface"
        for name in env:
            if name.startswith(("NCCL_", "FI_")):
                assert f"`{name}`" in readme, f"{name} is set by {folder.name} but not documented in infra/README.md"


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_ipc_lock_exactly_where_rdma_is_used(folder):
    for where, spec, c in ray_containers(rayjob(folder)):
        limits = (c.get("resources") or {}).get("limits") or {}
        rdma = any(k.startswith(RDMA_RESOURCES) for k in limits)
        added = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        assert added == (["IPC_LOCK"] if rdma else []), f"{folder.name} {where}: capabilities.add {added} (RDMA: {rdma})"
        assert all(c["resources"]["requests"].get(k) == v for k, v in limits.items() if k.startswith(RDMA_RESOURCES)), \
            f"{where}: RDMA devices need equal requests and limits"


def test_rdma_examples_exist():
    """One overlay per common RDMA fabric: AWS EFA and InfiniBand/RoCE."""
    used = {folder.name: [k for _, _, c in ray_containers(rayjob(folder))
                          for k in (c.get("resources") or {}).get("limits", {}) if k.startswith(RDMA_RESOURCES)]
            for folder in overlays()}
    assert any("vpc.amazonaws.com/efa" in v for v in used.values()), used
    assert any(any(k.startswith("rdma/") for k in v) for v in used.values()), used


@pytest.mark.parametrize("folder", overlays(), ids=ids(overlays()))
def test_priority_classes_are_created_by_cluster_setup(folder):
    classes = {d["metadata"]["name"] for d in of_kind(rendered(CLUSTER_SETUP), "PriorityClass")}
    for doc in workloads(folder):
        for where, tmpl in pod_templates(doc):
            name = tmpl["spec"].get("priorityClassName")
            assert name is None or name in classes, f"{where}: priorityClassName {name!r} is not in cluster-setup {classes}"
    for g in gpu_groups(rayjob(folder)):
        assert g["template"]["spec"].get("priorityClassName") in classes, "GPU pods need a priority class"


def test_kueue_example_admits_the_rayjob_as_one_gang():
    queued = [f for f in overlays() if "kueue.x-k8s.io/queue-name" in (rayjob(f)["metadata"].get("labels") or {})]
    assert queued, "no overlay shows Kueue"
    setup = rendered(CLUSTER_SETUP)
    for folder in queued:
        job = rayjob(folder)
        assert job["spec"].get("suspend") is True, "Kueue admits a RayJob created suspended"
        queue = job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
        (local,) = [d for d in of_kind(rendered(folder), "LocalQueue") if d["metadata"]["name"] == queue]
        (cq,) = [d for d in of_kind(setup, "ClusterQueue") if d["metadata"]["name"] == local["spec"]["clusterQueue"]]
        quota = {r["name"]: r["nominalQuota"] for group in cq["spec"]["resourceGroups"]
                 for flavor in group["flavors"] for r in flavor["resources"]}
        gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu_groups(job))
        assert quota["nvidia.com/gpu"] >= gpus, "the ClusterQueue cannot ever admit the whole job"
        flavors = {d["metadata"]["name"]: d for d in of_kind(setup, "ResourceFlavor")}
        for group in cq["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors


def test_irsa_variant_uses_the_pods_identity_instead_of_static_keys():
    variants = [f for f in overlays()
                if any("eks.amazonaws.com/role-arn" in (d["metadata"].get("annotations") or {})
                       for d in of_kind(rendered(f), "ServiceAccount"))]
    assert variants, "no overlay shows IRSA (object storage without static keys)"
    for folder in variants:
        text = yaml.safe_dump(rayjob(folder))
        assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text
        (sa,) = [d for d in of_kind(rendered(folder), "ServiceAccount") if "annotations" in d["metadata"]]
        for where, tmpl in pod_templates(rayjob(folder)):
            assert tmpl["spec"]["serviceAccountName"] == sa["metadata"]["name"], where
