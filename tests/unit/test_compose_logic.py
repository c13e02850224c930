"""Compose command construction (v1 and v2) and the compose-file validator, without Docker."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer_sandbox import config, isolation, policy
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.host import compose, compose_check

ROOT = Path(__file__).resolve().parents[2]


def project(tool: compose.ComposeTool) -> compose.ComposeProject:
    return compose.ComposeProject(tool, Path("/p"), (Path("/p/a.yml"), Path("/p/b.yml")), {})


def test_v2_command():
    tool = compose.ComposeTool(("docker", "compose"), "v2", "2.29.1")
    assert project(tool).argv("up", "-d") == [
        "docker",
        "compose",
        "--project-name",
        "stigmer-sandbox",
        "--project-directory",
        "/p",
        "--file",
        "/p/a.yml",
        "--file",
        "/p/b.yml",
        "up",
        "-d",
    ]


def test_v1_before_1_27_needs_compatibility_for_deploy_limits():
    old = compose.ComposeTool(("docker-compose",), "v1", "1.26.2")
    new = compose.ComposeTool(("docker-compose",), "v1", "1.29.2")
    assert "--compatibility" in project(old).argv("up")
    assert "--compatibility" not in project(new).argv("up")


def test_detect_prefers_v2_then_v1(monkeypatch):
    versions = {"docker": "2.29.1", "docker-compose": "1.29.2"}
    monkeypatch.setattr(compose, "_probe", lambda argv: versions.get(argv[0]))
    assert compose.detect("auto").flavour == "v2"
    assert compose.detect("v1").prefix == ("docker-compose",)
    versions.pop("docker")
    assert compose.detect("auto").flavour == "v1"
    versions.clear()
    with pytest.raises(compose.SandboxError, match="Docker Compose is not installed"):
        compose.detect("auto")


def mounts(tmp_path) -> compose_check.MountContext:
    """Host paths resolved as for a project in `tmp_path`."""
    settings = config.Settings(project_dir=str(tmp_path))
    return compose_check.MountContext(tmp_path, policy.Protected.of(settings))


def resolved(service: dict, **top: dict) -> dict:
    return {"services": {"sandbox": {"image": "x", **service}}, **top}


@pytest.mark.parametrize(
    ("service", "key", "expected"),
    [
        ({"privileged": True}, "privileged", "true is not allowed"),
        ({"privileged": "yes"}, "privileged", "yes is not allowed"),
        ({"network_mode": "host"}, "network_mode", "host shares the host's namespace"),
        ({"pid": "host"}, "pid", "host shares"),
        ({"ipc": "host"}, "ipc", "host shares"),
        ({"uts": "host"}, "uts", "host shares"),
        ({"userns_mode": "host"}, "userns_mode", "host shares"),
        ({"pid": "container:other"}, "pid", "a container this check cannot see"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add", "SYS_ADMIN is not allowed"),
        ({"cap_add": ["cap_net_raw", "KILL"]}, "cap_add", "NET_RAW is not allowed"),
        ({"cap_add": ["ALL"]}, "cap_add", "ALL is not allowed"),
        ({"security_opt": ["seccomp=unconfined"]}, "security_opt", "seccomp=unconfined"),
        ({"security_opt": ["apparmor:unconfined"]}, "security_opt", "apparmor:unconfined"),
        ({"security_opt": ["label:disable"]}, "security_opt", "label:disable"),
        ({"security_opt": ["no-new-privileges:false"]}, "security_opt", "not allowed"),
        ({"devices": ["/dev/sda:/dev/sda"]}, "devices", "exposes host devices"),
        ({"device_cgroup_rules": ["c 1:3 mr"]}, "device_cgroup_rules", "host devices"),
        ({"cgroup_parent": "/"}, "cgroup_parent", "away from its limits"),
        ({"sysctls": {"net.ipv4.ping_group_range": "0 1"}}, "sysctls", "kernel limits"),
        ({"volumes_from": ["container:x"]}, "volumes_from", "cannot see"),
        ({"entrypoint": ["sh"]}, "entrypoint", "as root"),
        ({"oom_kill_disable": True}, "oom_kill_disable", "out-of-memory"),
        ({"healthcheck": {"test": ["CMD", "sh"]}}, "healthcheck", "as root"),
        ({"environment": {"LD_PRELOAD": "/workspace/x.so"}}, "environment", "LD_PRELOAD"),
        ({"environment": ["BASH_ENV=/workspace/x"]}, "environment", "BASH_ENV"),
        ({"volumes": ["/var/run/docker.sock:/var/run/docker.sock:rw"]}, "volumes", "Docker socket"),
        ({"volumes": ["/root/.aws:/home/sandbox/.aws:rw"]}, "volumes", "would be allowed"),
        ({"volumes": [{"type": "bind", "source": "/etc", "target": "/x"}]}, "volumes", "/etc"),
        ({"volumes": ["/etc/cron.d:/x:rw"]}, "volumes", "system folder /etc"),
        ({"volumes": ["/:/host:ro"]}, "volumes", "/ (/)"),
    ],
)
def test_each_dangerous_setting_is_one_problem_naming_the_key(tmp_path, service, key, expected):
    (problem,) = compose_check.problems(resolved(service), mounts(tmp_path))
    assert problem.service == "sandbox" and problem.key == key
    text = problem.text()
    assert text.startswith(f"service 'sandbox': {key}: ") and expected in text and "\n" not in text


def test_top_level_volumes_secrets_and_configs_cannot_reach_the_host(tmp_path):
    bound = {"driver_opts": {"type": "none", "o": "bind", "device": "/var/run"}}
    top = {
        "volumes": {"v": bound, "plain": {}},
        "secrets": {"s": {"file": "/var/run/docker.sock"}},
        "configs": {"c": {"file": str(tmp_path / "x")}},
    }
    found = compose_check.problems(resolved({}, **top), mounts(tmp_path))
    assert [(p.key, p.service) for p in found] == [("volumes", None), ("secrets", None)]
    assert "v binds /var/run" in found[0].text() and "Docker socket" in found[1].text()


def test_the_database_service_keeps_its_own_capabilities_and_no_more(tmp_path):
    database = {"image": "db", "cap_add": ["CHOWN", "SETUID", "SETGID", "FOWNER", "DAC_OVERRIDE"]}
    config_ = {"services": {"database": database}}
    assert compose_check.problems(config_, mounts(tmp_path)) == []
    database["cap_add"].append("SYS_PTRACE")
    (problem,) = compose_check.problems(config_, mounts(tmp_path))
    assert problem.service == "database" and "SYS_PTRACE" in problem.text()


def test_the_project_files_pass_and_broken_yaml_is_named(tmp_path):
    for name in (compose.BASE_FILE, compose.ADVANCED_FILE, compose.DATABASE_FILE):
        assert compose_check.problems(compose_check.load(ROOT / name), mounts(tmp_path)) == []
    broken = tmp_path / "c.yml"
    broken.write_text("services: [\n")
    with pytest.raises(ConfigError, match=r"c\.yml: invalid YAML at line"):
        compose_check.load(broken)


def test_the_base_file_and_the_enforced_override_confine_like_sandbox_up(tmp_path):
    settings = config.Settings(
        project_dir=str(tmp_path), workspace=str(tmp_path / "w"), logs=str(tmp_path / "l")
    )
    spec = policy.container_spec(settings, "image", {})
    base = compose_check.load(ROOT / compose.BASE_FILE)["services"]["sandbox"]
    for key in ("user", "cap_drop", "cap_add", "security_opt", "init", "hostname"):
        assert base[key] == spec[key], key
    assert base["command"] == policy.KEEPALIVE
    tmpfs = dict(entry.split(":", 1) for entry in base["tmpfs"])
    assert tmpfs[policy.RUN_DIR] == spec["tmpfs"][policy.RUN_DIR]
    assert tmpfs["/tmp"] == spec["tmpfs"]["/tmp"].replace(
        policy.tmpfs_size(settings.tmp_size), "${STIGMER_TMP_SIZE:-512m}"
    )
    enforced = compose_check.load(compose.Override(settings).write())["services"]["sandbox"]
    assert {key: enforced[key] for key in compose.ENFORCED_KEYS} == {
        key: spec[key] for key in compose.ENFORCED_KEYS
    }
    assert enforced["command"] == [policy.KEEPALIVE] and "network_mode" not in enforced
    cut_off = compose.Override(settings.replace(network="none")).write()
    assert compose_check.load(cut_off)["services"]["sandbox"]["network_mode"] == "none"


def test_a_gvisor_compose_sandbox_holds_its_commands_to_the_process_limit(tmp_path):
    """Under gVisor the engine's pids_limit leaves room for gVisor's own host tasks, so the
    commands' limit is the nproc ulimit, which the override must carry (it did not: a
    fork loop then had the whole raised limit)."""
    settings = config.Settings(
        project_dir=str(tmp_path),
        workspace=str(tmp_path / "w"),
        logs=str(tmp_path / "l"),
        pids_limit=256,
    )
    for choice, ulimits in (("gvisor", {"nproc": {"soft": 256, "hard": 256}}), ("container", None)):
        written = compose.Override(settings.replace(isolation=choice)).write()
        enforced = compose_check.load(written)["services"]["sandbox"]
        assert enforced.get("ulimits") == ulimits, choice
        assert enforced["pids_limit"] == isolation.host_pids_limit(choice, 256)


def test_sizes_reach_compose_as_the_kernel_and_engine_read_them(tmp_path, monkeypatch):
    monkeypatch.setattr(
        compose, "detect", lambda _flavour: compose.ComposeTool(("true",), "v2", "2")
    )
    monkeypatch.setattr(compose, "resolved_config", lambda _target: {})
    monkeypatch.setattr(compose.compose_egress, "placement", lambda _settings: None)
    settings = config.Settings(
        project_dir=str(ROOT),
        workspace=str(tmp_path / "w"),
        logs=str(tmp_path / "l"),
        state_dir=str(tmp_path / "s"),
        tmp_size="1.5g",
        memory="1.5g",
    )
    environment = compose.project(settings).environment
    assert environment["STIGMER_TMP_SIZE"] == str(int(1.5 * 1024**3))
    assert environment["STIGMER_MEMORY"] == str(int(1.5 * 1024**3))


def test_project_checks_the_workspace_before_writing_anything(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    settings = config.Settings(project_dir=str(project), workspace=str(project))
    with pytest.raises(ConfigError, match=r"^workspace: .*the project folder"):
        compose.project(settings)
    assert list(project.iterdir()) == []


# -- property tests: any dangerous setting, wherever it sits, is named -----------------------

BENIGN = {
    "working_dir": st.just("/workspace"),
    "labels": st.dictionaries(st.sampled_from(["a", "b.c"]), st.text(max_size=5), max_size=2),
    "environment": st.dictionaries(st.sampled_from(["NODE_ENV", "FOO"]), st.text(max_size=5)),
    "ports": st.lists(st.sampled_from(["3000:3000", "8080"]), max_size=2),
    # What both the sandbox and the database service add.
    "cap_add": st.lists(st.sampled_from(["SETUID", "setgid", "CAP_SETGID"]), max_size=3),
    "security_opt": st.just(["no-new-privileges:true"]),
    "volumes": st.just(["/srv/project-data:/data:rw"]),
}
DANGEROUS = st.one_of(
    st.sampled_from([True, "true", "yes", "1"]).map(lambda v: ("privileged", v)),
    st.sampled_from(compose_check.NAMESPACE_KEYS).map(lambda k: (k, "host")),
    st.sampled_from(sorted(policy.DANGEROUS_CAPABILITIES | {"NET_RAW", "MKNOD"})).flatmap(
        lambda cap: st.sampled_from([cap, cap.lower(), f"CAP_{cap}"]).map(
            lambda c: ("cap_add", ["SETUID", c])
        )
    ),
    st.sampled_from(
        ["seccomp=unconfined", "seccomp:unconfined", "apparmor=unconfined", "label:disable"]
    ).map(lambda o: ("security_opt", ["no-new-privileges:true", o])),
    st.just(("devices", ["/dev/kmsg"])),
    st.just(("cgroup_parent", "host")),
    st.just(("sysctls", {"kernel.shmmax": "1"})),
    st.sampled_from(["/var/run/docker.sock", "/run", "/etc", "/root/.ssh"]).map(
        lambda source: ("volumes", [f"{source}:/x:rw"])
    ),
    st.sampled_from(["LD_PRELOAD", "LD_AUDIT", "BASH_ENV"]).map(
        lambda name: ("environment", {name: "/workspace/x"})
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    benign=st.fixed_dictionaries({}, optional=BENIGN),
    dangerous=DANGEROUS,
    name=st.sampled_from(["sandbox", "database"]),
)
def test_a_generated_service_with_one_dangerous_setting_is_refused_naming_it(
    benign, dangerous, name
):
    key, value = dangerous
    service = {**benign, key: value}
    context = compose_check.MountContext(Path("/srv/p"), policy.Protected.of(SETTINGS))
    found = compose_check.problems({"services": {name: service}}, context)
    sandbox_only = key == "environment" and name != "sandbox"
    assert [(p.service, p.key) for p in found] == ([] if sandbox_only else [(name, key)])
    benign_only = {"services": {name: benign}}
    assert compose_check.problems(benign_only, context) == []


SETTINGS = config.Settings(project_dir="/srv/p")


@st.composite
def extends_chains(draw):
    """Files whose services extend one another (same file or another, or a YAML merge
    key), the dangerous key at a random depth; returns the files, the file the key is
    written in, and the key."""
    depth = draw(st.integers(min_value=0, max_value=4))
    key, value = draw(DANGEROUS)
    files: dict[str, dict] = {"f0.yml": {"services": {}}}
    where = ("f0.yml", "sandbox")
    for level in range(depth):
        target_file = draw(st.sampled_from([where[0], f"f{level + 1}.yml"]))
        files.setdefault(target_file, {"services": {}})
        target = (target_file, f"base{level}")
        link = {"service": target[1]}
        if target_file != where[0]:
            link["file"] = target_file
        files[where[0]]["services"].setdefault(where[1], {})["extends"] = link
        where = target
    via_anchor = draw(st.booleans())
    files[where[0]]["services"].setdefault(where[1], {"image": "x"})
    return files, where, key, value, via_anchor


def write_chain(folder: Path, files: dict, where: tuple, key: str, value, via_anchor: bool):
    import yaml

    for name, document in files.items():
        text = yaml.safe_dump(document)
        if name == where[0]:
            anchor = yaml.safe_dump({"x-bad": {key: value}}).replace("x-bad:", "x-bad: &bad", 1)
            if via_anchor:  # the key reaches the service only through `<<: *bad`
                text = text.replace(f"  {where[1]}:\n", f"  {where[1]}:\n    <<: *bad\n", 1)
            else:
                service = yaml.safe_dump({key: value}).replace("\n", "\n    ")
                text = text.replace(f"  {where[1]}:\n", f"  {where[1]}:\n    {service}\n", 1)
            text = anchor + text
        (folder / name).write_text(text)


@settings(max_examples=150, deadline=None)
@given(chain=extends_chains())
def test_the_file_that_writes_a_refused_key_is_found_through_extends_and_anchors(chain):
    files, where, key, value, via_anchor = chain
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_chain(root, files, where, key, value, via_anchor)
        problem = compose_check.Problem(key, "refused", "sandbox")
        assert compose_check.origin([root / "f0.yml"], problem, root) == root / where[0]
