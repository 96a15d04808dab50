"""The OPC UA server of the running machine: model, security, publisher, gate, recipes.

    Client --(SignAndEncrypt, user)--> asyncua Server
        address space  <- model.py (types from nodesets/, instances from the config)
        values/events  <- publisher.py (snapshots of the scan; never blocks it)
        writes/methods -> gate.py (role, type, range) -> PLC commands -> the scan's verdict + audit
        recipes        <-> records.py (SQLAlchemy; the recipe book survives restarts)

``TemperingServer(cfg, plc, records, program=...).start()`` serves the machine at
``opcua.endpoint``; ``stop()`` ends it. ``plc`` is the window's end of the link to the PLC
process (``plc.bridge.PlcClient``: snapshots, commands and verdicts). The recipe book served and
used by the PLC is the one in the records (seeded from ``recipes.yaml`` on the first start, sent
to the PLC on every connection), so recipes edited over OPC UA survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from asyncua import Server, ua
from pydantic import ValidationError

from plc.config import Recipe, recipe_misfits
from plc.interlocks import condition_ids
from plc.state import RUNNING, Phase

from .alarm_performance import AlarmPerformance
from .batch_view import BatchView
from .conditions import ConditionServer
from .gate import COMMANDS, Gate, Refused, WriteRule, autotune_commands, zone_rules
from .model import (RECIPE_FIELDS, add_recipe_nodes, build_machine, load_types, recipe_value,
                    remove_recipe_nodes, with_recipe_value)
from .notifiers import SERVER, new_event, notify
from .publisher import Publisher
from .security import sees_audit

log = logging.getLogger(__name__)
SC = ua.StatusCodes

RECIPE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


# an alarm command's Part 9 audit event type (§5.10), instead of AuditUpdateMethodEventType
_CONDITION_AUDIT = {"Acknowledge": ua.ObjectIds.AuditConditionAcknowledgeEventType,
                    "Confirm": ua.ObjectIds.AuditConditionConfirmEventType,
                    "AddComment": ua.ObjectIds.AuditConditionCommentEventType,
                    "SetAlarmEnabled": ua.ObjectIds.AuditConditionEnableEventType,
                    "Shelve": ua.ObjectIds.AuditConditionShelvingEventType,
                    "Unshelve": ua.ObjectIds.AuditConditionShelvingEventType}


class TemperingServer:
    def __init__(self, cfg, plc, records, *, program, pki=None, app_uri: str | None = None,
                 history: Callable[[], Any] = lambda: None,
                 link_names: tuple[str, ...] = (), history_store=None):
        self.history_store = history_store
        self.cfg = cfg
        self.settings = cfg.opcua
        self.plc = plc
        self.program = program
        self.channel = plc.channel
        self.records = records
        self.pki = pki
        self.links = plc.links
        self.history = history
        self.link_names = link_names
        self.app_uri = app_uri or f"urn:open-tempering:server:{cfg.machine.id}"
        self.server = Server()
        self.nodes = None
        self.gate: Gate | None = None
        self.publisher: Publisher | None = None
        self.conditions: ConditionServer | None = None
        self.batches: BatchView | None = None
        self.book: dict[str, Recipe] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._method_nodes: dict[str, Any] = {}    # audit target -> method node (beyond nodes.methods)

    # -- set-up ----------------------------------------------------------------------------

    async def build(self) -> None:
        """Everything but listening: security, the model, the instances, the gate."""
        from .security import configure_security

        await self.server.init()
        await self.server.set_application_uri(self.app_uri)
        self.server.set_server_name(f"Tempering machine {self.cfg.machine.id} ({self.cfg.machine.name})")
        await configure_security(self.server, self.settings, self.records, self.pki, app_uri=self.app_uri)
        self.book = recipe_book(self.records)
        self.plc.set_recipes(self.book)
        await load_types(self.server)
        self.nodes = await build_machine(self.server, self.cfg, self.book,
                                         condition_ids(self.program), self.link_names)
        self.gate = Gate(self.server, self.plc, self.records, announce=self._announce)
        for zone, rules in ((z, zone_rules(z, self.plc)) for z in self.nodes.zones):
            for browse, rule in rules.items():
                if browse in self.nodes.zones[zone]:
                    self.gate.add_rule(self.nodes.zones[zone][browse], rule)
        for rid in self.book:
            self._recipe_rules(rid)
        for name, (role, make) in COMMANDS.items():
            self.server.link_method(self.nodes.methods[name], self.gate.command_method(name, role, make))
        for zone, methods in self.nodes.autotune.items():     # Zones.<Zone>.Autotune.Start, ...
            for name, (role, make) in autotune_commands(zone).items():
                if name in methods:
                    target = f"{zone}.Autotune.{name}"
                    self._method_nodes[target] = methods[name]
                    self.server.link_method(methods[name], self.gate.command_method(target, role, make))
        for name, handler in (("AddRecipe", self._add_recipe), ("UpdateRecipe", self._update_recipe),
                              ("DeleteRecipe", self._delete_recipe),
                              ("DuplicateRecipe", self._duplicate_recipe)):
            if name in self.nodes.methods:
                self.server.link_method(self.nodes.methods[name], self.gate.method(name, "admin", handler))
        self.gate.install()
        self.conditions = ConditionServer(self.server, self.nodes, self.gate, self.program,
                                          max_shelve_s=self.program.limits.max_shelve_s,
                                          performance=AlarmPerformance(time.time()),
                                          journal=self.records, machine_id=self.cfg.machine.id)
        await self.conditions.install()
        await self._serve_history()
        self.batches = BatchView(self.server, self.nodes, self.records, self.gate)
        self.batches.install()
        await self.batches.idle()
        import gc
        gc.collect()
        gc.freeze()     # the address space lives as long as the server: keep it out of every
                        # later collection (a full one over it would take the scan's time)
        self.publisher = Publisher(self.server, self.nodes, self.channel,
                                   interval_s=self.settings.publish_interval_ms / 1000.0,
                                   links=self.links, history=self.history, sessions=self.sessions,
                                   conditions=self.conditions,
                                   plc_status=self.plc.status,
                                   plc_info=lambda: (self.plc.info.get("scheduling", ""),
                                                     self.plc.plc_dropped),
                                   heating_outputs={z.name: z.heating_outputs for z in self.program.zones})

    async def start(self) -> None:
        if self.nodes is None:
            await self.build()
        await self.server.start()
        await self._publish_recipes()
        self._tasks.append(asyncio.create_task(self.publisher.run(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop()

    async def _serve_history(self) -> None:
        """Zone temperatures: Historizing, HistoryRead access, answered from the local store
        (when there is one); the machine's events from the alarm journal."""
        from .history import LocalHistory, answer_per_node

        answer_per_node(self.server)         # a store's failure is that node's StatusCode
        zones = {}
        for zone, nodes in self.nodes.zones.items():
            if self.history_store is None:
                break
            node = nodes["Temperature"]
            for attr in (ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel):
                await node.set_attr_bit(attr, ua.AccessLevel.HistoryRead)
            await node.write_attribute(ua.AttributeIds.Historizing,
                                       ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
            zones[node.nodeid] = zone
        self.server.iserver.history_manager.set_storage(
            LocalHistory(self.history_store, zones, self.cfg.machine.id,
                         events=self.conditions.history if self.records is not None else None))

    # -- diagnostics and events --------------------------------------------------------------

    def sessions(self) -> tuple[int, int]:
        """(OPC UA sessions open, subscriptions): the diagnostics' and the metrics' figures."""
        iserver = self.server.iserver
        sessions = len(getattr(iserver, "_external_sessions", ()) or ())   # asyncua 2.1
        subs = len(getattr(iserver.subscription_service, "subscriptions", {}) or {})
        return sessions, subs

    async def _announce(self, action: str, user: str, target: str, result: str, cmd) -> None:
        """What became of a command or call, for the clients: an AuditUpdateMethodEventType
        (calls and commands) or AuditWriteUpdateEventType (writes) event (OPC UA Part 5 §6.4.27,
        §6.4.25; for an alarm's method the Part 9 AuditCondition*EventType about the condition,
        §5.10) about the machine object, on the Server object and on the machine object
        (``notifiers.notify``: one EventId), to admins and to the sessions of the user who acted
        (``security.sees_audit``). Message: the target, the user and the result with the scan's
        reason ("StartRecipe by op: BadInvalidState: a batch is heating; ..."); Status: accepted
        or not; StatusCodeId (calls): the result's code; ClientAuditEntryId: the command's id,
        as in the audit trail."""
        ok = result == "Good"
        machine = self.nodes.machine.nodeid
        if action == "write":
            ev = new_event(ua.ObjectIds.AuditWriteUpdateEventType, machine, target)
            ev.AttributeId = int(ua.AttributeIds.Value)
        else:
            condition = self.nodes.conditions.get(getattr(cmd, "alarm_id", None) or "")
            etype = _CONDITION_AUDIT.get(type(cmd).__name__) if condition is not None else None
            ev = new_event(etype or ua.ObjectIds.AuditUpdateMethodEventType,
                           condition.nodeid if etype else machine, target)
            method = self.nodes.methods.get(target) or self._method_nodes.get(target)
            ev.MethodId = method.nodeid if method is not None else None
            ev.StatusCodeId = ua.StatusCode(getattr(SC, result.split(":")[0], SC.BadUnexpectedError))
            if etype is not None:           # Part 9 §5.10: the condition's own audit events
                if hasattr(ev, "ConditionEventId"):
                    ev.ConditionEventId = cmd.event_id
                if hasattr(ev, "Comment"):
                    ev.Comment = ua.LocalizedText(getattr(cmd, "comment", ""), "en")
                if hasattr(ev, "ShelvingTime"):
                    duration = getattr(cmd, "duration_s", None)
                    ev.ShelvingTime = None if duration is None else duration * 1000.0
        ev.Message = ua.LocalizedText(f"{target} by {user}: {'accepted' if ok else result}")
        ev.Severity = 100 if ok else 500
        ev.Status = ok
        ev.ClientUserId = user
        ev.ClientAuditEntryId = cmd.id if cmd is not None else ""
        ev.ServerId = self.app_uri
        ev.ActionTimeStamp = datetime.now(timezone.utc)
        await notify(self.server, ev, (SERVER, machine), audience=lambda u: sees_audit(u, user))

    # -- recipes -------------------------------------------------------------------------------

    def _recipe_in_use(self, rid: str) -> bool:
        s = self.plc.latest
        return s is not None and s.recipe_id == rid and Phase(s.phase) in RUNNING

    def _validated(self, rid: str, fields: dict) -> Recipe:
        try:
            recipe = Recipe.model_validate(fields)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or rid}: {err['msg']}" for err in e.errors())
            raise Refused(SC.BadOutOfRange, f"recipe {rid}: {msg}") from None
        misfits = recipe_misfits(self.cfg.machine_config, recipe)
        if misfits:
            raise Refused(SC.BadOutOfRange, "; ".join(f"recipe {rid}.{f}: {m}" for f, m in misfits))
        return recipe

    async def _commit(self, rid: str, recipe: Recipe | None) -> None:
        """Persist (off the event loop), then hand the book to the PLC (from its next scan)."""
        if recipe is None:
            await asyncio.to_thread(self.records.delete_recipe, rid)
            self.book.pop(rid, None)
        else:
            await asyncio.to_thread(self.records.save_recipe, rid, recipe.model_dump())
            self.book[rid] = recipe
        self.plc.set_recipes(self.book)

    def _recipe_rules(self, rid: str) -> None:
        nodes = self.nodes.recipes[rid]
        for browse, field in RECIPE_FIELDS.items():
            if browse not in nodes:
                continue
            vtype = self.nodes.variant_types[nodes[browse].nodeid]

            async def after(value, rid=rid, field=field):
                if rid not in self.book:
                    raise Refused(SC.BadNodeIdUnknown, f"recipe {rid} was deleted")
                if self._recipe_in_use(rid):
                    raise Refused(SC.BadInvalidState, f"recipe {rid} is used by the running batch")
                fields = with_recipe_value(self.book[rid].model_dump(), field, value)
                await self._commit(rid, self._validated(rid, fields))

            self.gate.add_rule(nodes[browse], WriteRule("admin", vtype, lambda v: None,
                                                        f"recipes.{rid}.{field}", after))

    async def _publish_recipes(self) -> None:
        for rid, recipe in self.book.items():
            await self._publish_recipe(rid, recipe)

    async def _publish_recipe(self, rid: str, recipe: Recipe) -> None:
        nodes = self.nodes.recipes.get(rid, {})
        data = recipe.model_dump()
        for browse, field in RECIPE_FIELDS.items():
            if browse in nodes:
                value = recipe_value(data, field)
                vtype = self.nodes.variant_types[nodes[browse].nodeid]
                await self.server.write_attribute_value(
                    nodes[browse].nodeid, ua.DataValue(ua.Variant(
                        float(value) if vtype is ua.VariantType.Double else value, vtype)))

    def _check_id(self, rid: Any) -> str:
        if not isinstance(rid, str):
            raise Refused(SC.BadTypeMismatch, "RecipeId must be a String")
        if not rid or set(rid) - RECIPE_ID_CHARS:
            raise Refused(SC.BadOutOfRange, f"RecipeId must be lower-case letters, digits and - (got {rid!r})")
        return rid

    async def _add(self, rid: str, recipe: Recipe) -> None:
        await self._commit(rid, recipe)
        await add_recipe_nodes(self.server, self.nodes, rid, recipe)
        self._recipe_rules(rid)
        await self._publish_recipe(rid, recipe)

    async def _add_recipe(self, user, rid, name, heating, cooling, pouring, working_max):
        rid = self._check_id(rid)
        if rid in self.book:
            raise Refused(SC.BadBrowseNameDuplicated, f"recipe {rid} exists")
        for v in (heating, cooling, pouring, working_max):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Refused(SC.BadTypeMismatch, "goals are Double")
        base = {"mixer_enabled": True, "fountain_enabled": True, "mold_heater_enabled": False,
                "vibration_enabled": False, "vib_heater_enabled": False, "pedal": "manual",
                "pedal_on_time": 2.0, "pedal_off_time": 3.0}
        recipe = self._validated(rid, base | {"name": name, "heating_goal": heating,
                                              "cooling_goal": cooling, "pouring_goal": pouring,
                                              "working_max": working_max})
        await self._add(rid, recipe)
        return []

    async def _update_recipe(self, user, rid, field_browse, value):
        rid = self._check_id(rid)
        if rid not in self.book:
            raise Refused(SC.BadNotFound, f"no recipe {rid}")
        if field_browse not in RECIPE_FIELDS:
            raise Refused(SC.BadOutOfRange, f"no recipe field {field_browse!r} "
                                            f"(one of {', '.join(RECIPE_FIELDS)})")
        if self._recipe_in_use(rid):
            raise Refused(SC.BadInvalidState, f"recipe {rid} is used by the running batch")
        field = RECIPE_FIELDS[field_browse]
        recipe = self._validated(rid, with_recipe_value(self.book[rid].model_dump(), field, value))
        await self._commit(rid, recipe)
        await self._publish_recipe(rid, recipe)
        return []

    async def _delete_recipe(self, user, rid):
        rid = self._check_id(rid)
        if rid not in self.book:
            raise Refused(SC.BadNotFound, f"no recipe {rid}")
        if self._recipe_in_use(rid):
            raise Refused(SC.BadInvalidState, f"recipe {rid} is used by the running batch")
        if rid == self.cfg.machine.default_recipe:
            raise Refused(SC.BadInvalidState, f"recipe {rid} is the machine's default recipe")
        if len(self.book) == 1:
            raise Refused(SC.BadInvalidState, "the last recipe cannot be deleted")
        await self._commit(rid, None)
        for node in self.nodes.recipes.get(rid, {}).values():
            self.gate.rules.pop(node.nodeid, None)
        await remove_recipe_nodes(self.server, self.nodes, rid)
        return []

    async def _duplicate_recipe(self, user, source, new_id, new_name):
        source = self._check_id(source)
        new_id = self._check_id(new_id)
        if source not in self.book:
            raise Refused(SC.BadNotFound, f"no recipe {source}")
        if new_id in self.book:
            raise Refused(SC.BadBrowseNameDuplicated, f"recipe {new_id} exists")
        recipe = self._validated(new_id, self.book[source].model_dump() | {"name": new_name})
        await self._add(new_id, recipe)
        return []


def recipe_book(records) -> dict[str, Recipe]:
    """The recipe book: the records' recipes (id -> Recipe)."""
    return {rid: Recipe.model_validate(fields) for rid, fields in records.load_recipes().items()}


INITIAL_ADMIN_FILE = "initial-admin-password"


def open_records(settings, book, base_dir: str | Path = ".", machine: str | None = None):
    """The records database (``opcua.database_url``, else SQLite in ``opcua.data_dir``) as
    ``machine`` sees it, its recipe book (its own, or ``opcua.recipe_library``) seeded with the
    recipes file on the book's first use (SchemaTooNew: a newer program's database, nothing
    written), with an administrator: when no user exists yet,
    one ``admin`` with a random password, written to ``<data_dir>/initial-admin-password``
    (mode 0600) and announced once. Returns (records, note or "")."""
    import os
    import secrets

    from .records import Records

    data_dir = Path(base_dir) / settings.data_dir
    url = settings.database_url or f"sqlite:///{(data_dir / 'tempering.db').resolve()}"
    records = Records(url, machine=machine, recipe_library=settings.recipe_library)
    records.seed_recipes(book)
    note = ""
    if not records.list_users():
        password = secrets.token_urlsafe(12)
        records.add_user("admin", password, "admin")
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / INITIAL_ADMIN_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        note = (f"first start: user 'admin' (role admin) created; its password is in {path}. "
                f"Add users with `tempering users add NAME --role operator|technician|viewer`.")
    return records, note


async def start_server(cfg, plc, records, *, program, history=lambda: None,
                       link_names: tuple[str, ...] = (), base_dir: str | Path = ".",
                       history_store=None) -> TemperingServer:
    """Open the PKI, build and start the server on ``records`` (``open_records``)."""
    from .security import Pki

    pki = Pki(Path(base_dir) / cfg.opcua.data_dir / "pki")
    server = TemperingServer(cfg, plc, records, program=program, pki=pki, history=history,
                             link_names=link_names, history_store=history_store)
    await server.start()
    return server
