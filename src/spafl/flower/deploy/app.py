"""What Flower reads: the app bundle for ``flwr run`` and the config texts (TOML values, ``--node-config``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from spafl.errors import UserError

PYPROJECT_ENV = "SPAFL_FLOWER_PYPROJECT"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config_arg(values: dict[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value``, strings double-quoted."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise UserError(f"node config {key}={value!r}: quotes are not allowed in values")
        parts.append(f"{key}={value}" if isinstance(value, (int, float)) else f'{key}="{value}"')
    return " ".join(parts)


def find_app_pyproject() -> Path:
    """The ``pyproject.toml`` that declares the spafl Flower app (``[tool.flwr.app]``).

    ``$SPAFL_FLOWER_PYPROJECT`` if set, else the one of the source checkout spafl
    is imported from (an editable install).
    """
    import spafl

    override = os.environ.get(PYPROJECT_ENV)
    candidate = Path(override) if override else Path(spafl.__file__).resolve().parents[2] / "pyproject.toml"
    if candidate.is_file() and "[tool.flwr.app" in candidate.read_text():
        return candidate
    raise UserError(
        f"no Flower app declaration ([tool.flwr.app] in {candidate}) found; deploy-local needs the spafl "
        f"source checkout installed with `pip install -e '.[flower]'` (or ${PYPROJECT_ENV} naming its pyproject.toml)"
    )


def stage_app(dest: Path, pyproject: Path | None = None) -> Path:
    """A copy of the Flower app for ``flwr run``: ``pyproject.toml`` plus the files its ``fab-include`` names.

    ``flwr run <repository>`` would walk the whole checkout, ``.venv`` included
    (several seconds), and may rewrite its ``pyproject.toml`` (Flower 1.41
    migrates a ``[tool.flwr.federations]`` table); the copy avoids both and
    bundles the same files. The SuperLink and SuperNodes import
    ``spafl.flower.*`` from the installed spafl package.
    """
    try:  # Python 3.11+
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    source = pyproject or find_app_pyproject()
    root = source.parent
    patterns = tomllib.loads(source.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include", [])
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copyfile(source, dest / "pyproject.toml")
    for pattern in patterns:
        for path in root.glob(pattern.lstrip("/")):
            relative = path.relative_to(root)
            if path.is_file() and "__pycache__" not in relative.parts and relative.parts[0] != ".venv":
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / relative)
    return dest
