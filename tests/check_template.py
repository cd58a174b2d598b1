#!/usr/bin/env python3
"""Checks that template.yaml keeps the deployment operable, so removing one property fails a test:

- every function logs JSON into a log group of its own with a retention, and is traced by X-Ray;
  its memory is a parameter (the worker's defaults to one full vCPU, 1769 MB);
- the state machine logs to a log group (ERROR or ALL) and is traced;
- both HTTP APIs write JSON access logs;
- the data tables and the export bucket are retained (and the tables deletion-protected);
- alarms notify the SNS topic, on every dead-letter queue's depth, every function's errors and
  throttles, every HTTP API's 5xx, and failed executions; the e-mail subscription is optional;
- the export bucket's lifecycle expires FHIR export files (`<hex job id>/`, one rule per first digit)
  and reaches study export files (`study-<job>/`, kept up to 3,650 days by their study) only after that;
- no stack output hands out an ARN or the account id.

It then checks itself: each check must fail on a copy of the template with that property removed.
Usage: check_template.py [template.yaml]   (run by tests/run.sh with the tools' Python, which has PyYAML)
"""
import copy
import json
import sys

import yaml


class Loader(yaml.SafeLoader):
    """Reads CloudFormation's short forms (`!Ref X`) as their long forms (`{"Ref": "X"}`)."""


def _intrinsic(loader, suffix, node):
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


Loader.add_multi_constructor("!", _intrinsic)


def resources_of(template, kind):
    return {n: r for n, r in template["Resources"].items() if r["Type"] == kind}


def ref_name(value):
    """The resource a `!Ref X` or `!GetAtt X.Attr` names, else None."""
    if isinstance(value, dict):
        if "Ref" in value:
            return value["Ref"]
        if "Fn::GetAtt" in value:
            return value["Fn::GetAtt"][0]
    return None


def function_property(template, function, name):
    own = function.get("Properties", {}).get(name)
    if own is not None:
        return own
    return template.get("Globals", {}).get("Function", {}).get(name)


def check(t):
    problems = []
    params = t.get("Parameters", {})
    log_groups = resources_of(t, "AWS::Logs::LogGroup")

    def retained_group(value, what):
        group = ref_name(value)
        if group not in log_groups:
            problems.append(f"{what}: not a log group of the template ({value})")
        elif "RetentionInDays" not in log_groups[group].get("Properties", {}):
            problems.append(f"{what}: log group {group} has no RetentionInDays")

    functions = resources_of(t, "AWS::Serverless::Function")
    if not functions:
        problems.append("no functions")
    for name, fn in functions.items():
        logging = dict(function_property(t, fn, "LoggingConfig") or {})
        logging.update(fn.get("Properties", {}).get("LoggingConfig") or {})
        if logging.get("LogFormat") != "JSON":
            problems.append(f"{name}: LogFormat is not JSON")
        retained_group(logging.get("LogGroup"), f"{name} LoggingConfig.LogGroup")
        if function_property(t, fn, "Tracing") != "Active":
            problems.append(f"{name}: Tracing is not Active")
        memory = ref_name(function_property(t, fn, "MemorySize"))
        if memory not in params:
            problems.append(f"{name}: MemorySize is not a parameter")
    worker_memory = ref_name(function_property(t, functions.get("WorkerFunction", {}), "MemorySize"))
    if params.get(worker_memory, {}).get("Default") != 1769:
        problems.append("the worker's memory does not default to 1769 MB (one vCPU)")

    machines = resources_of(t, "AWS::Serverless::StateMachine")
    if not machines:
        problems.append("no state machine")
    for name, machine in machines.items():
        props = machine.get("Properties", {})
        logging = props.get("Logging", {})
        if logging.get("Level") not in ("ERROR", "ALL"):
            problems.append(f"{name}: no execution logging")
        destinations = logging.get("Destinations") or [{}]
        retained_group(destinations[0].get("CloudWatchLogsLogGroup", {}).get("LogGroupArn"), f"{name} Logging")
        if props.get("Tracing", {}).get("Enabled") is not True:
            problems.append(f"{name}: Tracing not enabled")

    apis = resources_of(t, "AWS::Serverless::HttpApi")
    if not apis:
        problems.append("no HTTP API")
    for name, api in apis.items():
        settings = (api.get("Properties") or {}).get("AccessLogSettings", {})
        retained_group(settings.get("DestinationArn"), f"{name} AccessLogSettings")
        try:
            json.loads(settings.get("Format", ""))
        except ValueError:
            problems.append(f"{name}: the access log format is not JSON")

    for kind in ("AWS::DynamoDB::Table", "AWS::S3::Bucket"):
        stores = resources_of(t, kind)
        if not stores:
            problems.append(f"no {kind}")
        for name, store in stores.items():
            for policy in ("DeletionPolicy", "UpdateReplacePolicy"):
                if store.get(policy) != "Retain":
                    problems.append(f"{name}: {policy} is not Retain")
            if kind == "AWS::DynamoDB::Table" and store["Properties"].get("DeletionProtectionEnabled") is not True:
                problems.append(f"{name}: no deletion protection")

    # Alarms: what each watches, and that it notifies the topic.
    topics = resources_of(t, "AWS::SNS::Topic")
    watched = set()
    for name, alarm in resources_of(t, "AWS::CloudWatch::Alarm").items():
        props = alarm["Properties"]
        if not any(ref_name(a) in topics for a in props.get("AlarmActions", [])):
            problems.append(f"{name}: does not notify an SNS topic")
        metrics = [props] + [m["MetricStat"]["Metric"] for m in props.get("Metrics", []) if "MetricStat" in m]
        for metric in metrics:
            for dimension in metric.get("Dimensions", []):
                watched.add((metric.get("Namespace"), metric.get("MetricName"), ref_name(dimension["Value"])))
    queues = resources_of(t, "AWS::SQS::Queue")
    dead_letter = {
        ref_name(q["Properties"]["RedrivePolicy"]["deadLetterTargetArn"])
        for q in queues.values()
        if "RedrivePolicy" in q.get("Properties", {})
    }
    if not dead_letter:
        problems.append("no dead-letter queues")
    for dlq in dead_letter:
        if ("AWS/SQS", "ApproximateNumberOfMessagesVisible", dlq) not in watched:
            problems.append(f"{dlq}: no alarm on its depth")
    for name in functions:
        for metric in ("Errors", "Throttles"):
            if ("AWS/Lambda", metric, name) not in watched:
                problems.append(f"{name}: no {metric} alarm")
    for name in apis:
        if ("AWS/ApiGateway", "5xx", name) not in watched:
            problems.append(f"{name}: no 5xx alarm")
    for name in machines:
        if ("AWS/States", "ExecutionsFailed", name) not in watched:
            problems.append(f"{name}: no alarm on failed executions")
    subscriptions = resources_of(t, "AWS::SNS::Subscription")
    if "AlarmEmail" not in params or not any(
        s.get("Condition") and ref_name(s["Properties"].get("Endpoint")) == "AlarmEmail" for s in subscriptions.values()
    ):
        problems.append("no optional AlarmEmail subscription")

    bucket = t["Resources"].get("ExportBucket", {}).get("Properties", {})
    rules = [r for r in bucket.get("LifecycleConfiguration", {}).get("Rules", []) if "ExpirationInDays" in r]
    prefixes = {r.get("Prefix", r.get("Filter", {}).get("Prefix", "")) for r in rules}
    for digit in "0123456789abcdef":
        if digit not in prefixes:
            problems.append(f"ExportBucket: no lifecycle rule expires FHIR export files under '{digit}'")
    for rule in rules:
        prefix = rule.get("Prefix", rule.get("Filter", {}).get("Prefix", ""))
        days = rule["ExpirationInDays"]
        if "study-".startswith(prefix) or prefix.startswith("study-"):
            if not isinstance(days, int) or days < 3650 + 2:
                problems.append(f"ExportBucket: rule {rule.get('Id')} can delete study export files before their retention")

    for name, output in t.get("Outputs", {}).items():
        text = json.dumps(output["Value"])
        if "AWS::AccountId" in text or '"Arn"' in text or "arn:" in text:
            problems.append(f"output {name} hands out an ARN or the account id")
    return problems


def without(template, edit):
    broken = copy.deepcopy(template)
    edit(broken)
    return broken


def first(template, kind):
    return next(r for r in template["Resources"].values() if r["Type"] == kind)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "template.yaml"
    with open(path) as f:
        template = yaml.load(f, Loader=Loader)
    problems = check(template)
    if problems:
        print("template.yaml is not operable:\n  " + "\n  ".join(problems))
        return 1

    # The checks can fail: each removal below must be reported.
    def drop_alarm_on(namespace):
        def edit(t):
            name = next(
                n for n, r in t["Resources"].items()
                if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == namespace
            )
            del t["Resources"][name]
        return edit

    removals = {
        "Globals Tracing": lambda t: t["Globals"]["Function"].pop("Tracing"),
        "Globals LogFormat": lambda t: [
            t["Globals"]["Function"]["LoggingConfig"].pop("LogFormat"),
            [f["Properties"].get("LoggingConfig", {}).pop("LogFormat", None)
             for f in resources_of(t, "AWS::Serverless::Function").values()],
        ],
        "a log group's retention": lambda t: first(t, "AWS::Logs::LogGroup")["Properties"].pop("RetentionInDays"),
        "a table's DeletionPolicy": lambda t: first(t, "AWS::DynamoDB::Table").pop("DeletionPolicy"),
        "a table's deletion protection": lambda t: first(t, "AWS::DynamoDB::Table")["Properties"].pop(
            "DeletionProtectionEnabled"),
        "the bucket's DeletionPolicy": lambda t: first(t, "AWS::S3::Bucket").pop("DeletionPolicy"),
        "a DLQ alarm": drop_alarm_on("AWS/SQS"),
        "a Lambda alarm": drop_alarm_on("AWS/Lambda"),
        "an API 5xx alarm": drop_alarm_on("AWS/ApiGateway"),
        "state machine logging": lambda t: first(t, "AWS::Serverless::StateMachine")["Properties"].pop("Logging"),
        "state machine tracing": lambda t: first(t, "AWS::Serverless::StateMachine")["Properties"].pop("Tracing"),
        "an access log": lambda t: first(t, "AWS::Serverless::HttpApi")["Properties"].pop("AccessLogSettings"),
        "a lifecycle rule of FHIR export files": lambda t: t["Resources"]["ExportBucket"]["Properties"][
            "LifecycleConfiguration"]["Rules"].pop(),
        "a lifecycle rule for every object": lambda t: t["Resources"]["ExportBucket"]["Properties"][
            "LifecycleConfiguration"]["Rules"].append({"Id": "All", "Status": "Enabled", "ExpirationInDays": 3}),
        "an ARN output": lambda t: t["Outputs"].update(
            {"Leak": {"Value": {"Fn::GetAtt": ["ExportStateMachine", "Arn"]}}}),
    }
    for what, edit in removals.items():
        if not check(without(template, edit)):
            print(f"the template check does not notice removing {what}")
            return 1
    print(f"template.yaml: operable ({len(removals)} removals each caught)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
