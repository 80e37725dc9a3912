"""`dynvllm planner` (scale a running service to latency targets) and `dynvllm profile` (measure
what one worker of a role sustains). The planner's modules are imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

from dynvllm.cli.calls import timeout_option
from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _ints(text: str, flag: str) -> list[int]:
    from dynvllm.cli.failure import fail as _fail

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise _fail(f"{flag} takes positive integers separated by commas (got {text!r})")
    return values


def _frontend_url(settings: Settings) -> str:
    from dynvllm.cli.failure import fail as _fail
    from dynvllm.runtime import state

    if settings.planner.frontend_url:
        return settings.planner.frontend_url.rstrip("/")
    info = state.lookup(settings.runtime.namespace) or {}
    if not info.get("http_port"):
        raise _fail(f"no frontend recorded for namespace {settings.runtime.namespace!r}: pass --frontend-url")
    return f"http://127.0.0.1:{info['http_port']}"


def _vocab(model: str) -> int:
    """Token ids random prompts may use: the tokenizer's vocabulary (the frontend refuses others)."""
    import json

    from dynvllm.models.hub import resolve_model

    folder = Path(resolve_model(model, None))
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=False)
    except Exception:  # no tokenizer.json (a sentencepiece model): the config's size, else a safe one
        try:
            return int(json.loads((folder / "config.json").read_text()).get("vocab_size") or 500)
        except (OSError, ValueError, TypeError):
            return 500


def register(app: typer.Typer) -> None:
    @app.command("planner")
    @with_settings("runtime", "planner")
    def planner_cmd(settings: Settings) -> None:
        """Scale a running service's workers to the TTFT/ITL targets (see docs/planner.md)."""
        from dynvllm import registry
        from dynvllm.cli.failure import fail as _fail
        from dynvllm.planner.profile import ProfileError, load
        from dynvllm.planner.service import run_planner
        from dynvllm.runtime import state

        ps = settings.planner
        if ps.planner_profile is None:
            raise _fail("the planner needs --planner-profile: write one with `dynvllm profile`")
        try:
            profile = load(ps.planner_profile)
            roles = ps.role_list() or list(profile.roles)
            for role in roles:
                profile.capacity(role, 1, 1, ps.ttft_target, ps.itl_target)
            registry.load(registry.PLANNER_PREDICTORS, ps.predictor)
            registry.load(registry.PLANNER_CONNECTORS, ps.planner_connector)
            settings.runtime.nats_url = state.resolve_nats_url(
                settings.runtime.nats_url, settings.runtime.namespace
            )
        except (ProfileError, registry.PluginError, LookupError) as exc:
            raise _fail(str(exc)) from None
        raise typer.Exit(run_planner(settings, profile, roles, _frontend_url(settings)))

    @app.command("scale")
    @with_settings("runtime")
    def scale_cmd(
        settings: Settings,
        role: str = typer.Argument(..., help="Role whose workers change."),
        count: int = typer.Argument(..., min=0, max=256, help="Workers wanted (fewer drain, more start)."),
        timeout: float = timeout_option(),
    ) -> None:
        """Start or drain workers of a role on the `serve` of a namespace (what the planner's local
        connector asks)."""
        import msgpack

        from dynvllm.cli.failure import fail as _fail
        from dynvllm.runtime import nats as natsrt
        from dynvllm.runtime import state
        from dynvllm.supervisor_control import subject

        rt = settings.runtime

        async def ask() -> dict:
            nc = await natsrt.connect(rt, name="dynvllm-scale", give_up_after=timeout)
            try:
                token = rt.admin_token.get_secret_value() if rt.admin_token else None
                payload = {"op": "scale", "role": role, "count": count, "admin_token": token}
                msg = await nc.request(subject(rt.namespace), msgpack.packb(payload), timeout)
                return msgpack.unpackb(msg.data, raw=False)
            finally:
                await natsrt.close(nc)

        try:
            rt.nats_url = state.resolve_nats_url(rt.nats_url, rt.namespace)
            answer = natsrt.run(ask())
        except (LookupError, natsrt.NatsUnavailable) as exc:
            raise _fail(str(exc)) from None
        except Exception as exc:  # nobody answers on the subject: no `serve` in this namespace
            raise _fail(
                f"no `dynvllm serve` answered in namespace {rt.namespace!r} ({type(exc).__name__})"
            ) from None
        if "error" in answer:
            raise _fail(answer["error"], 1)
        typer.echo(
            f"{role}: {count} wanted; started {answer['started'] or 'none'}, "
            f"draining {answer['draining'] or 'none'}"
        )

    @app.command("profile", context_settings=_EXTRA)
    @with_settings("runtime", "worker", "engine", plugins=True)
    def profile_cmd(
        ctx: typer.Context,
        settings: Settings,
        role: str = typer.Option(
            "agg",
            "--role",
            help="Role to profile (one that serves requests alone), or the roles of a disaggregated "
            "service with one worker each (prefill,decode): prefill's capacity is then read by TTFT, "
            "decode's by ITL.",
        ),
        isl: str = typer.Option("128,512", "--isl", help="Prompt lengths, comma-separated."),
        osl: str = typer.Option("32,128", "--osl", help="Output lengths, comma-separated."),
        concurrency: str = typer.Option("1,2,4,8,16", "--concurrency", help="Concurrency levels swept."),
        requests: int = typer.Option(
            32, "--requests", min=1, help="Requests per level (at least the level)."
        ),
        output: Path = typer.Option(
            Path("profile.json"), "--output", "-o", help="Profile JSON; another role's points in it are kept."
        ),
        url: str | None = typer.Option(
            None,
            "--url",
            help="Profile this running service (one worker of the role) instead of starting one.",
        ),
    ) -> None:
        """Measure one worker of a role: request rate, TTFT and ITL per concurrency and (ISL, OSL)."""
        import json
        import os

        from dynvllm import registry
        from dynvllm.cli.failure import fail as _fail
        from dynvllm.cli.serve import _check_topology, _checked_roles
        from dynvllm.planner.profile import BOTH, Profile, ProfileError, load
        from dynvllm.planner.profiler import profile_role
        from dynvllm.runtime import nats as natsrt

        isls, osls, levels = _ints(isl, "--isl"), _ints(osl, "--osl"), _ints(concurrency, "--concurrency")
        eng = settings.engine
        if not eng.model:
            raise _fail("no model: pass --model (the one to profile)")
        name = eng.served_model_name or eng.model
        names = [r.strip() for r in role.split(",") if r.strip()]
        if not names or len(set(names)) != len(names):
            raise _fail(f"--role takes role names separated by commas, each once (got {role!r})")
        service = None
        if url is None:
            from dynvllm.supervisor import Service

            topology = [(r, 1) for r in names]
            _check_topology(_checked_roles(settings, names), topology)
            settings.runtime.namespace = f"profile-{os.getpid()}"
            settings.frontend.http_host, settings.frontend.http_port = "127.0.0.1", 0
            service = Service(settings, topology)
        try:
            terminal = {r: registry.load(registry.ROLES, r).terminal for r in names}
        except registry.PluginError as exc:
            raise _fail(str(exc)) from None
        # One role: held to both targets. Several (a request crosses each): a stage before
        # another sets the first token, the last one the gaps between tokens.
        targets = {r: BOTH if len(names) == 1 else ("itl",) if terminal[r] else ("ttft",) for r in names}
        try:
            if service is not None:
                service.start()
                if not service.wait_ready():
                    raise _fail("the worker to profile did not start (see its output above)", 1)
                url = service.http_url()
            assert url is not None
            typer.echo(
                f"profiling {'+'.join(names)} of {name} at {url}: ISL {isls} x OSL {osls}, "
                f"concurrency {levels}",
                err=True,
            )
            measured = natsrt.run(
                profile_role(
                    url.rstrip("/"),
                    name,
                    names[0],
                    isls,
                    osls,
                    levels,
                    requests,
                    _vocab(eng.model),
                    settings.worker.engine,
                )
            )
        finally:
            if service is not None:
                service.stop()
        try:
            kept = load(output) if output.exists() else Profile({})
        except ProfileError as exc:
            raise _fail(f"{output} is there and is not a profile ({exc}): choose another --output") from None
        points = measured.roles[names[0]]
        merged = Profile(
            {**kept.roles, **{r: points for r in names}},
            model=name,
            engine=settings.worker.engine,
            targets={**kept.targets, **targets},
        )
        output.write_text(json.dumps(merged.to_dict(), indent=1))
        for p in points:
            for lv in p.sweep:
                typer.echo(
                    f"isl {p.isl:>6} osl {p.osl:>5} c {lv.concurrency:>3}: {lv.request_rate:8.2f} req/s  "
                    f"TTFT p90 {lv.ttft_p90 * 1000:8.1f} ms  ITL p90 {lv.itl_p90 * 1000:7.1f} ms"
                )
        typer.echo(f"wrote {output}")
