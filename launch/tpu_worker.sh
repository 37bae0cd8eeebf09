#!/bin/bash
# Runs on every TPU VM worker; launch/tpu_vm.py copies it with the code and calls it.
#   tpu_worker.sh start LOG_DIR CMD...  start CMD in the background (unless it already runs),
#                                       appending to LOG_DIR/train.log, exit code to LOG_DIR/exit_code
#   tpu_worker.sh status LOG_DIR        one line: lumos-jax-status host=H state=running|exited|missing [code=N]
set -u
action=${1:-}
logs=${2:-}
if [ -z "$action" ] || [ -z "$logs" ]; then
  echo "usage: tpu_worker.sh start|status LOG_DIR [CMD...]" >&2
  exit 2
fi
shift 2
mkdir -p "$logs"
alive() { [ -f "$logs/pid" ] && kill -0 "$(cat "$logs/pid")" 2>/dev/null; }
case "$action" in
  start)
    if alive; then
      echo "lumos-jax: already running (pid $(cat "$logs/pid")) on $(hostname)"
      exit 0
    fi
    rm -f "$logs/exit_code"
    echo "=== lumos-jax start $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $*" >> "$logs/train.log"
    # setsid + nohup: the job outlives the ssh session that started it.
    setsid nohup bash -c '"$@" >> "$0/train.log" 2>&1; echo $? > "$0/exit_code"' "$logs" "$@" \
      < /dev/null > /dev/null 2>&1 &
    echo $! > "$logs/pid"
    ;;
  status)
    if [ -f "$logs/exit_code" ]; then
      echo "lumos-jax-status host=$(hostname) state=exited code=$(cat "$logs/exit_code")"
    elif alive; then
      echo "lumos-jax-status host=$(hostname) state=running"
    else
      echo "lumos-jax-status host=$(hostname) state=missing"
    fi
    ;;
  *)
    echo "tpu_worker.sh: unknown action $action (expected start or status)" >&2
    exit 2
    ;;
esac
