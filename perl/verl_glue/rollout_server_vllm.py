"""PeRL's vLLM server and replica classes for the early server start (perl.verl_glue.rollout_server,
patches/README.md #12): verl's, with a server that can start empty and be initialised later, and a
replica that takes it. Apart from rollout_server.py because importing them imports vLLM."""

from __future__ import annotations

import ray
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from perl.verl_glue import rollout_server
from perl.verl_glue.rollout_server import EarlyServerClass, _ray_options


class _PerlvLLMHttpServer(vLLMHttpServer):
    def __init__(self, *args, **kwargs):
        """With verl's arguments, verl's server. Without any (`start_server_early`): a process
        that has imported the server's modules, until `start` runs the same initialisation."""
        if args or kwargs:
            super().__init__(*args, **kwargs)

    def start(self, **kwargs) -> None:
        super().__init__(**kwargs)


PerlvLLMHttpServer = ray.remote(_PerlvLLMHttpServer)


def start_server_early(options: dict) -> bool:
    """Start the rollout server's process now, empty, with `options` (`early_server_options`); once
    per process. Returns whether it started one."""
    if rollout_server._EARLY:
        return False
    rollout_server._EARLY["options"] = options
    rollout_server._EARLY["handle"] = PerlvLLMHttpServer.options(**_ray_options(options)).remote()
    return True


class PerlvLLMReplica(vLLMReplica):
    """verl's vLLM replica whose server is PeRL's (verl's server, which can also start empty and be
    initialised later), taken from `start_server_early` when there is one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = EarlyServerClass(PerlvLLMHttpServer)
