"""The cost of generating a message from its schema (``reply: {$generate: ...}``, ``virtsvc fake``).

A message type of 1,000 fields is built in code: singular strings, integers, doubles, bools, enums and
timestamps under names that pick every kind of realistic value (ids, emails, names, prices, ...), a few
repeated fields and maps. Each round generates it under a new seed, in one process, after a warm-up that
fills the Faker pools and the type's plan. Prints one JSON object: the median, p90 and best wall-clock
microseconds per message over the rounds, the median and p90 of the thread's CPU time, and the field count.

    python bench/synthetic.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2

from virtsvc.scenarios.synthetic import generate

F = descriptor_pb2.FieldDescriptorProto
NAMES = (
    "id",
    "account_id",
    "email",
    "name",
    "first_name",
    "city",
    "currency_code",
    "title",
    "description",
    "sku",
    "page_token",
    "qty",
    "units",
    "exp_month",
    "price",
    "score",
    "enabled",
    "status",
    "created_at",
    "label",
)
TYPES = {
    "id": F.TYPE_STRING,
    "account_id": F.TYPE_STRING,
    "email": F.TYPE_STRING,
    "name": F.TYPE_STRING,
    "first_name": F.TYPE_STRING,
    "city": F.TYPE_STRING,
    "currency_code": F.TYPE_STRING,
    "title": F.TYPE_STRING,
    "description": F.TYPE_STRING,
    "sku": F.TYPE_STRING,
    "page_token": F.TYPE_STRING,
    "qty": F.TYPE_INT32,
    "units": F.TYPE_INT64,
    "exp_month": F.TYPE_INT32,
    "price": F.TYPE_DOUBLE,
    "score": F.TYPE_FLOAT,
    "enabled": F.TYPE_BOOL,
    "status": F.TYPE_ENUM,
    "created_at": F.TYPE_MESSAGE,
    "label": F.TYPE_STRING,
}


def wide_type(n: int = 1000) -> object:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="bench/wide.proto",
        package="bench",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    enum = file.enum_type.add(name="Status")
    for i, v in enumerate(("STATUS_UNSPECIFIED", "ACTIVE", "CLOSED")):
        enum.value.add(name=v, number=i)
    msg = file.message_type.add(name="Wide")
    for i in range(n):
        base = NAMES[i % len(NAMES)]
        field = msg.field.add(
            name=f"{base}_{i}" if base != "id" else f"x{i}_id", number=i + 1, type=TYPES[base]
        )
        field.label = F.LABEL_REPEATED if i % 50 == 49 else F.LABEL_OPTIONAL
        if field.type == F.TYPE_ENUM:
            field.type_name = ".bench.Status"
        elif field.type == F.TYPE_MESSAGE:
            field.type_name = ".google.protobuf.Timestamp"
    pool.Add(file)
    return pool.FindMessageTypeByName("bench.Wide")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    desc = wide_type()
    for seed in range(50):  # warm-up: Faker pools and the type's plan
        generate(desc, seed)  # type: ignore[arg-type]
    times, cpu = [], []
    for seed in range(args.rounds):
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        generate(desc, seed)  # type: ignore[arg-type]
        cpu.append((time.thread_time_ns() - c) / 1000)
        times.append((time.perf_counter_ns() - t) / 1000)
    times.sort()
    cpu.sort()
    print(json.dumps({
        "fields": len(desc.fields),  # type: ignore[attr-defined]
        "rounds": args.rounds,
        "median_us": round(statistics.median(times), 1),
        "p90_us": round(times[int(len(times) * 0.9)], 1),
        "best_us": round(times[0], 1),
        # CPU time of the generating thread: the wall figures include time the machine gave to others
        "cpu_median_us": round(statistics.median(cpu), 1),
        "cpu_p90_us": round(cpu[int(len(cpu) * 0.9)], 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
