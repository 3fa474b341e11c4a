"""`spafl deploy-local`: the spafl Flower app on a real SuperLink and N SuperNodes.

Everything runs on the loopback interface (127.0.0.1) with Flower's own
deployment binaries (``flower-superlink``, ``flower-supernode``, ``flwr``) of
the Python environment spafl runs in:

* a private Flower home (``FLWR_HOME=DIR/.flower``) holds the ``flwr`` CLI's
  connection (``config.toml``), installed app bundles, generated certificates
  and SuperNode keys, so nothing touches ``~/.flwr``;
* every process gets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``
  (otherwise Flower builds a fresh environment for every run), no telemetry
  and no update check;
* each SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N
  state-dir=DIR/nodes/i"`` and its own Runtime API port;
* one log file per process in ``DIR/logs``: ``superlink.log``,
  ``supernode-<i>.log`` (with its ClientApp processes), ``serverapp.log``
  (the run's log stream) and ``flwr-cli.log``.

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on
one HTTP(S) port (``--host``/``--port``); a SuperNode serves its own Runtime
API on ``--port`` for its ClientApp processes.

The modules, one idea each:

* :mod:`.processes`: the supervisor: processes in sessions of their own,
  tagged with ``SPAFL_DEPLOY_ID``, found, signalled and waited for with psutil,
  stopped with SIGTERM and then SIGKILL (:func:`stop_processes`);
* :mod:`.signals`: how Ctrl-C, SIGTERM and SIGHUP are handled
  (:class:`InterruptGuard`);
* :mod:`.tls`: the CA, server certificate and SuperNode keys (``cryptography``);
* :mod:`.app`: the app bundle for ``flwr run`` and the config texts Flower reads;
* :mod:`.local`: :class:`LocalDeployment`, the reusable part (tests use it): a
  context manager that starts the SuperLink and the SuperNodes and can stop,
  kill (SIGKILL) and restart a single SuperNode; :mod:`.runs` adds submitting
  and following runs with the ``flwr`` CLI;
* :mod:`.command`: the ``spafl deploy-local`` command (:func:`deploy_local`).
"""

from spafl.flower.deploy.app import PYPROJECT_ENV, find_app_pyproject, node_config_arg, stage_app, toml_value
from spafl.flower.deploy.command import CONFIG, SUMMARY, build_run_config, deploy_local
from spafl.flower.deploy.local import (
    LOOPBACK,
    NODE_CONNECTED,
    LocalDeployment,
    Node,
    flower_bin_dir,
    free_ports,
    port_open,
)
from spafl.flower.deploy.processes import (
    ANSI,
    DEPLOY_ID_ENV,
    DEPLOY_ROLE_ENV,
    DeployError,
    ManagedProcess,
    processes_with_env,
    stop_processes,
    tagged_processes,
)
from spafl.flower.deploy.runs import CONNECTION, STATUS_COMPLETED
from spafl.flower.deploy.signals import InterruptGuard, _SignalsHeld
from spafl.flower.deploy.tls import write_node_keys, write_tls_files

__all__ = [
    "ANSI", "CONFIG", "CONNECTION", "DEPLOY_ID_ENV", "DEPLOY_ROLE_ENV", "LOOPBACK", "NODE_CONNECTED", "PYPROJECT_ENV",
    "STATUS_COMPLETED", "SUMMARY", "DeployError", "InterruptGuard", "LocalDeployment", "ManagedProcess", "Node",
    "_SignalsHeld", "build_run_config", "deploy_local", "find_app_pyproject", "flower_bin_dir", "free_ports",
    "node_config_arg", "port_open", "processes_with_env", "stage_app", "stop_processes", "tagged_processes",
    "toml_value", "write_node_keys", "write_tls_files",
]
