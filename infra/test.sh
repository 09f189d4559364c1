#!/usr/bin/env bash
# `make test`: one real Kafka broker for the whole run (in a temp dir), the whole pytest suite
# against it and the embedded ClickHouse engine, and the broker stopped (by pid) whatever happens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

state="$(mktemp -d -t tidemark-test.XXXXXX)"
cleanup() {
  infra/kafka/kafka.sh stop "$state/kafka" || true
  rm -rf "$state"
}
trap cleanup EXIT

TIDEMARK_TEST_KAFKA_BOOTSTRAP="$(infra/kafka/kafka.sh start "$state/kafka")"
export TIDEMARK_TEST_KAFKA_BOOTSTRAP
echo "Kafka for the tests: $TIDEMARK_TEST_KAFKA_BOOTSTRAP"

.venv/bin/python -m pytest "$@"
