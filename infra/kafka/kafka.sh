#!/usr/bin/env bash
# The local Apache Kafka broker (single-node KRaft: broker + controller in one process).
#
#   infra/kafka/kafka.sh jars               resolve the jars from Maven Central (cached in infra/kafka/lib)
#   infra/kafka/kafka.sh start DIR [PORT]   format DIR once, start the broker on free loopback ports,
#                                           wait until it serves, print its bootstrap address
#   infra/kafka/kafka.sh stop DIR           stop the broker started in DIR (by pid), cleanly
#   infra/kafka/kafka.sh status DIR         print the bootstrap address if the broker in DIR runs
#
# DIR holds everything of one broker: server.properties, data/, server.log, pid, bootstrap.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB="$HERE/lib"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"

die() { echo "kafka.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

jars() {
  # The stamp records the pom it was resolved from, so a version bump re-resolves.
  local stamp="$LIB/.resolved"
  if [[ -f "$stamp" ]] && cmp -s "$stamp" "$HERE/pom.xml"; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to resolve the Kafka jars"
  rm -rf "$LIB"
  mkdir -p "$LIB"
  mvn -q -B -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$LIB" -DincludeScope=runtime > "$LIB/maven.log" 2>&1 \
    || { cat "$LIB/maven.log" >&2; die "Maven could not resolve the Kafka jars"; }
  cp "$HERE/pom.xml" "$stamp"
}

running() {
  local dir="$1"
  [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

start() {
  local dir="${1:?usage: kafka.sh start DIR [PORT]}" port="${2:-}"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if running "$dir"; then
    cat "$dir/bootstrap"
    return 0
  fi
  jars
  command -v java >/dev/null || die "Java 17+ is needed to run Kafka"
  # A restarted broker keeps its ports: KRaft records the controller's address in its log.
  local controller_port
  if [[ -f "$dir/ports" ]]; then
    read -r port controller_port < "$dir/ports"
  else
    [[ -n "$port" ]] || port="$(free_port)"
    controller_port="$(free_port)"
  fi
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:${controller_port}
listeners=PLAINTEXT://127.0.0.1:${port},CONTROLLER://127.0.0.1:${controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:${port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${dir}/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
PROPS
  local java_opts=(-Xms256m "-Xmx${KAFKA_HEAP_MAX:-768m}" -XX:+UseG1GC -Djava.awt.headless=true
                   "-Dlog4j2.configurationFile=$HERE/log4j2.xml" "-Dkafka.logs.dir=$dir")
  # Format once: a restarted broker keeps its data.
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')"
    java "${java_opts[@]}" -cp "$LIB/*" kafka.tools.StorageTool format --standalone \
         -t "$cluster_id" -c "$dir/server.properties" > "$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "formatting storage failed"; }
  fi
  echo "$port $controller_port" > "$dir/ports"
  : > "$dir/server.log"
  nohup java "${java_opts[@]}" -cp "$LIB/*" kafka.Kafka "$dir/server.properties" \
        > "$dir/stdout.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  local deadline=$((SECONDS + START_TIMEOUT))
  until grep -q "Kafka Server started" "$dir/server.log" 2>/dev/null; do
    if ! running "$dir"; then
      tail -n 40 "$dir/stdout.log" "$dir/server.log" >&2 || true
      die "the broker exited during start-up (logs in $dir)"
    fi
    (( SECONDS < deadline )) || { stop "$dir"; die "the broker did not start within ${START_TIMEOUT}s"; }
    sleep 0.2
  done
  echo "127.0.0.1:${port}" > "$dir/bootstrap"
  cat "$dir/bootstrap"
}

stop() {
  local dir="${1:?usage: kafka.sh stop DIR}"
  running "$dir" || { rm -f "$dir/pid"; return 0; }
  local pid
  pid="$(cat "$dir/pid")"
  kill -TERM "$pid"
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$dir/pid"
}

status() {
  local dir="${1:?usage: kafka.sh status DIR}"
  running "$dir" || die "no broker runs in $dir"
  cat "$dir/bootstrap"
}

case "${1:-}" in
  jars) jars ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) shift; status "$@" ;;
  *) die "usage: kafka.sh jars | start DIR [PORT] | stop DIR | status DIR" ;;
esac
