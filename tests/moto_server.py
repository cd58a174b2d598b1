"""moto's server, with fixes of its cost (not its behaviour) that the AWS tests depend on, and
of one race: DynamoDB writes are applied one at a time, as DynamoDB applies each item's writes
atomically (moto's threads could lose one of two concurrent `ADD`s to a counter).

moto 5.2 snapshots a transaction's tables with `copy.deepcopy` once per *action* (a
100-action transaction copies its table 100 times) and on failure puts the whole snapshot
back. Loading resources in transactions (version, compartment entries and current pointer
together) therefore costs time quadratic in the table's size, and the copies fragment the
heap until the kernel kills the server (seen in CI: one test file took moto past 20 GB).
Restoring whole tables also drops writes that other requests made meanwhile.

This wrapper keeps moto's checks and effects action for action and replaces only the
snapshot: it records the items the transaction touches and, if it is cancelled, restores
exactly those. That is what DynamoDB guarantees (all or nothing for the listed items) at a
cost proportional to the transaction, not to the table. Run it as `moto_server` is run:
`MOTO_PORT=P python tests/moto_server.py -H 127.0.0.1 -p P`.

SQS: moto's SendMessage reads the queue's `ContentBasedDeduplication`, and ReceiveMessage each
message's retention period, through the property that builds every attribute, counting the
queue's messages three times with a clock read per message; a fan-out of thousands of work
messages made each send and each received message cost as much as the queue held. Those two
now see the three counts as 0 (they never use them); GetQueueAttributes still counts. And the list of visible messages, which every ReceiveMessage (and
every second of a long poll) rebuilds, reads the clock once per list instead of twice per
message.

Query: moto answers a table query (no index) by sorting every item of the table, keeping the
partition asked for, and sizing each of its items before testing the sort key condition, so a
page read costs as much as the whole table and a `begins_with` read of a few items as much as
their partition. A table query now starts from the partition's items that meet the sort key
condition (moto still sorts, pages, tests and filters them itself); a `begins_with` on a string
sort key is tested as a plain string prefix, not through moto's generic comparison (a job's
partition holds thousands of items, and every finished item's tally read tested them all).
"""

import copy
import sys
import threading

from moto.dynamodb.comparisons import get_filter_expression
from moto.dynamodb.exceptions import (
    ConditionalCheckFailed,
    MockValidationException,
    MultipleTransactionsException,
    TooManyTransactionsException,
    TransactionCanceledException,
    TransactWriteSingleOpException,
)
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.table import Table
from moto.server import main
from moto.core.utils import unix_time_millis
from moto.sqs.models import Queue, SQSBackend


def _item_key(backend, table_name, op_type, op):
    """The key an action addresses, as moto computes it."""
    if op_type == "Put":
        attrs = op["Item"]
        table = backend.get_table(table_name)
        key = {table.hash_key_attr: attrs[table.hash_key_attr]}
        if table.range_key_attr is not None:
            key[table.range_key_attr] = attrs[table.range_key_attr]
        return key
    return op["Key"]


def _restore(backend, journal):
    """Puts every touched item back as it was before the transaction."""
    for table_name, hash_value, range_value, before in reversed(journal):
        table = backend.get_table(table_name)
        if range_value is not None:
            if before is None:
                table.items[hash_value].pop(range_value, None)
            else:
                table.items[hash_value][range_value] = before
        elif before is None:
            table.items.pop(hash_value, None)
        else:
            table.items[hash_value] = before


def transact_write_items(self, transact_items):
    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    target_items = set()
    journal = []  # (table, hash, range, item before the transaction or None)

    def check_unicity(table_name, key):
        item = (str(table_name), str(dict(sorted(key.items()))))
        if item in target_items:
            raise MultipleTransactionsException()
        target_items.add(item)

    errors = []
    for item in transact_items:
        original_item = None
        if len(list(item.keys())) > 1:
            raise TransactWriteSingleOpException
        try:
            op_type, op = next(iter(item.items()))
            if op_type not in {"ConditionCheck", "Put", "Delete", "Update"}:
                raise ValueError("Unsupported transaction operation")
            table_name = op["TableName"]
            condition_expression = op.get("ConditionExpression")
            names = op.get("ExpressionAttributeNames")
            values = op.get("ExpressionAttributeValues")
            key = _item_key(self, table_name, op_type, op)
            check_unicity(table_name, key)

            current = self.get_item(table_name, key)
            if condition_expression is not None:
                condition_op = get_filter_expression(condition_expression, names, values)
                if not condition_op.expr(current):
                    if op.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD" and current:
                        original_item = current.to_json()["Attributes"]
                    raise ConditionalCheckFailed(item=original_item)

            if op_type != "ConditionCheck":
                table = self.get_table(table_name)
                hash_value, range_value = self.get_keys_value(table, key)
                journal.append((table_name, hash_value, range_value, copy.deepcopy(current)))
            if op_type == "Put":
                self.put_item(
                    table_name,
                    op["Item"],
                    condition_expression=condition_expression,
                    expression_attribute_names=names,
                    expression_attribute_values=values,
                )
            elif op_type == "Delete":
                self.delete_item(
                    table_name,
                    key,
                    condition_expression=condition_expression,
                    expression_attribute_names=names,
                    expression_attribute_values=values,
                )
            elif op_type == "Update":
                self.update_item(
                    table_name,
                    key,
                    update_expression=op["UpdateExpression"],
                    condition_expression=condition_expression,
                    expression_attribute_names=names,
                    expression_attribute_values=values,
                )
            errors.append((None, None, None))
        except (MultipleTransactionsException, MockValidationException):
            _restore(self, journal)
            raise
        except ConditionalCheckFailed as e:
            errors.append(("ConditionalCheckFailed", str(e.message), original_item))
        except Exception as e:  # noqa: E722, as moto: report the action's error
            errors.append((type(e).__name__, str(e), original_item))

    if any(code is not None for code, _, _ in errors):
        _restore(self, journal)
        raise TransactionCanceledException(errors)


DynamoDBBackend.transact_write_items = transact_write_items

# Writes one at a time: moto's server answers requests on threads, and its updates read an item,
# change it and store it back, so two concurrent `ADD n :one` on one item could both read the same
# value and one increment was lost (a counter shared by every worker stayed short of its total).
# DynamoDB applies each write to an item atomically.
_writes = threading.RLock()


def _one_at_a_time(method):
    def wrapped(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)
    wrapped.__name__ = method.__name__
    return wrapped


for _name in ("put_item", "update_item", "delete_item", "transact_write_items",
              "batch_write_item"):
    if hasattr(DynamoDBBackend, _name):
        setattr(DynamoDBBackend, _name, _one_at_a_time(getattr(DynamoDBBackend, _name)))

_query_scope = threading.local()
_table_all_items = Table.all_items
_table_query = Table.query


def all_items(self):
    """The items of the partition a table query names that its sort key condition keeps, else
    moto's sorted scan of every item."""
    hash_key = getattr(_query_scope, "hash_key", None)
    if hash_key is None or not self.range_key_attr:
        return _table_all_items(self)
    partition = self.items[hash_key] if hash_key in self.items else {}
    # A copy: another thread may write to the partition meanwhile (reads take no lock).
    items = list(partition.values())
    comparison, objs = _query_scope.range_condition
    if comparison is None:
        return items
    if comparison == "BEGINS_WITH" and len(objs) == 1 and objs[0].type == "S":
        prefix = objs[0].value
        return [i for i in items
                if i.range_key.type == "S" and i.range_key.value.startswith(prefix)]
    return [i for i in items if i.range_key.compare(comparison, objs)]


def query(self, hash_key, range_comparison, range_objs, limit, exclusive_start_key,
          scan_index_forward, projection_expressions, index_name=None, *args, **kwargs):
    _query_scope.hash_key = None if index_name else hash_key
    _query_scope.range_condition = (range_comparison, range_objs)
    try:
        return _table_query(self, hash_key, range_comparison, range_objs, limit,
                            exclusive_start_key, scan_index_forward, projection_expressions,
                            index_name, *args, **kwargs)
    finally:
        _query_scope.hash_key = None


Table.all_items = all_items
Table.query = query

_uncounted = threading.local()


def _without_counts(method):
    """`method`, with the queue's message counts read as 0 while it runs (it never uses them)."""

    def wrapped(self, *args, **kwargs):
        _uncounted.active = True
        try:
            return method(self, *args, **kwargs)
        finally:
            _uncounted.active = False

    return wrapped


def _uncounted_inside(count):
    return property(lambda queue: 0 if getattr(_uncounted, "active", False) else count.fget(queue))


SQSBackend.send_message = _without_counts(SQSBackend.send_message)
SQSBackend.is_message_valid_based_on_retention_period = _without_counts(
    SQSBackend.is_message_valid_based_on_retention_period
)
for _name in (
    "approximate_number_of_messages",
    "approximate_number_of_messages_delayed",
    "approximate_number_of_messages_not_visible",
):
    setattr(Queue, _name, _uncounted_inside(getattr(Queue, _name)))


def _visible_messages(queue):
    now = unix_time_millis()
    return [m for m in queue._messages if now > m.visible_at and now >= m.delayed_until]


Queue.messages = property(_visible_messages)


if __name__ == "__main__":
    sys.argv[0] = "moto_server"
    sys.exit(main())
