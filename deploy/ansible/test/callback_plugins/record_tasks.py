# Records every task result (host, task name, action, its templated arguments, and
# whether it ran, changed or was skipped) as JSON lines in $RECORD_TASKS_FILE, so that
# tests can assert what a role does, or would do in --check mode.
import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: record_tasks
type: aggregate
short_description: record task arguments as JSON lines for tests
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_tasks"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        fields = getattr(result, "_task_fields", None) or {}
        task = result._task
        row = {
            "host": result._host.get_name(),
            "task": task.get_name(),
            "action": task.action,
            "args": fields.get("args", task.args),
            "status": status,
            "changed": bool(result._result.get("changed")),
        }
        if "item" in result._result:
            row["item"] = result._result["item"]
        with open(os.environ["RECORD_TASKS_FILE"], "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_item_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_item_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_item_on_failed(self, result):
        self._record(result, "failed")
