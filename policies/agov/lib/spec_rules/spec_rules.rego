# METADATA
# title: Spec-level rules for agov agents
# description: |
#   Checks one agent spec (input.agent) against the org limits (input.org)
#   and the limits in data.agov.config. Reused by agov.promotion and
#   agov.revalidation. Every check is written as "deny unless the good case
#   is proven", so a missing or mistyped field is a deny, never silence.
# scope: package
# schemas:
#   - input: schema.spec_rules_input
#   - input.agent: schema.agent_spec
package agov.lib.spec_rules

_config := data.agov.config

# Required anatomy parts and the JSON type each must have (and be non-empty).
_anatomy_parts := {
	"reasoning": "object",
	"inputs": "array",
	"actions": "array",
	"memory": "object",
}

_containment_fields := ["external_calls", "persistent_writes"]

# Enumerations from agent_spec.json.
_agent_types := {"autonomous", "supervised", "advisory", "mcp_server", "custom"}

_memory_kinds := {"none", "session", "persistent"}

# Required fields that no other code covers, with what each must be: a
# description, or the set of allowed values (messages are built only on a deny).
_required_fields := {
	"metadata.name": "a non-empty string",
	"metadata.version": "a non-empty string",
	"spec.agent_type": _agent_types,
	"spec.anatomy.reasoning.model": "a non-empty string",
	"spec.anatomy.memory.kind": _memory_kinds,
}

_valid_fields contains "metadata.name" if _non_empty_string(input.agent.metadata.name)

_valid_fields contains "metadata.version" if _non_empty_string(input.agent.metadata.version)

_valid_fields contains "spec.agent_type" if input.agent.spec.agent_type in _agent_types

_valid_fields contains "spec.anatomy.reasoning.model" if _non_empty_string(input.agent.spec.anatomy.reasoning.model)

_valid_fields contains "spec.anatomy.memory.kind" if input.agent.spec.anatomy.memory.kind in _memory_kinds

# Values used in messages. Each has a default, so that a message can always be
# built: a deny whose message is undefined would be a silent allow.
default _api_version := null

_api_version := input.agent.apiVersion

default _kind := null

_kind := input.agent.kind

default _agent_id := null

_agent_id := input.agent.metadata.id

default _role_class := null

_role_class := input.agent.spec.role_class

default _temperature := null

_temperature := input.agent.spec.anatomy.reasoning.temperature

default _temperature_limit := null

_temperature_limit := _config.temperature_limits[_role_class]

default _role_classes := []

_role_classes := sort(object.keys(_config.temperature_limits))

default _budget := null

_budget := input.agent.spec.economics.monthly_budget_usd

default _org_budget := null

_org_budget := input.org.max_monthly_budget_usd

# Negate rules, never calls on input refs: `not f(input.x)` is undefined when
# input.x is missing (OPA rewrites it to `t := input.x; not f(t)`, OPA issue 1877).
_agent_is_object if is_object(input.agent)

_finding(code, message) := {"code": code, "message": message}

_show(value) := json.marshal(value)

_describe(want) := sprintf("one of %v", [sort(want)]) if {
	is_set(want)
} else := want

_non_empty_string(value) if {
	is_string(value)
	trim_space(value) != ""
}

_non_negative_number(value) if {
	is_number(value)
	value >= 0
}

_valid_agent_id if {
	is_string(_agent_id)
	regex.match(`^[a-zA-Z0-9][a-zA-Z0-9\-_]{2,63}$`, _agent_id)
}

_anatomy_part_present(part) if {
	value := input.agent.spec.anatomy[part]
	type_name(value) == _anatomy_parts[part]
	count(value) > 0
}

_contained(field) if input.agent.spec.containment[field] == false

default _containment := {}

_containment := input.agent.spec.containment if is_object(input.agent.spec.containment)

_has_capabilities if {
	is_array(input.agent.spec.capabilities)
	count(input.agent.spec.capabilities) > 0
}

_temperature_within_limit if {
	_non_negative_number(_temperature)
	is_number(_temperature_limit)
	_temperature <= _temperature_limit
}

_temperature_problem := sprintf(
	"spec.anatomy.reasoning.temperature is %s, want a number >= 0",
	[_show(_temperature)],
) if {
	not _non_negative_number(_temperature)
} else := sprintf(
	"temperature %v cannot be checked: role_class %s has no temperature limit",
	[_temperature, _show(_role_class)],
) if {
	not is_number(_temperature_limit)
} else := sprintf("temperature %v exceeds the %v limit %v", [_temperature, _role_class, _temperature_limit])

_budget_within_limit if {
	_non_negative_number(_budget)
	is_number(_org_budget)
	_budget <= _org_budget
}

_budget_problem := sprintf(
	"spec.economics.monthly_budget_usd is %s, want a number >= 0",
	[_show(_budget)],
) if {
	not _non_negative_number(_budget)
} else := sprintf(
	"monthly budget %v USD cannot be checked: input.org.max_monthly_budget_usd is %s, want a number",
	[_budget, _show(_org_budget)],
) if {
	not is_number(_org_budget)
} else := sprintf("monthly budget %v USD exceeds the org limit %v USD", [_budget, _org_budget])

deny contains _finding("PROMOTION_DENY_INPUT_INVALID", "input.agent is missing or not an object") if {
	not _agent_is_object
}

deny contains _finding(
	"PROMOTION_DENY_INPUT_INVALID",
	sprintf("apiVersion is %s, want \"agov/v1\"", [_show(_api_version)]),
) if {
	_agent_is_object
	_api_version != "agov/v1"
}

deny contains _finding(
	"PROMOTION_DENY_INPUT_INVALID",
	sprintf("kind is %s, want \"Agent\"", [_show(_kind)]),
) if {
	_agent_is_object
	_kind != "Agent"
}

deny contains _finding(
	"PROMOTION_DENY_INPUT_INVALID",
	sprintf("%s must be %s", [field, _describe(want)]),
) if {
	_agent_is_object
	some field, want in _required_fields
	not field in _valid_fields
}

deny contains _finding(
	"PROMOTION_DENY_INVALID_AGENT_ID",
	sprintf(
		"metadata.id %s must be 3-64 characters of letters, digits, '-' or '_', starting with a letter or digit",
		[_show(_agent_id)],
	),
) if {
	not _valid_agent_id
}

deny contains _finding(
	"PROMOTION_DENY_ANATOMY_INCOMPLETE",
	sprintf("spec.anatomy.%s is missing or empty: it must be a non-empty %s", [part, kind]),
) if {
	some part, kind in _anatomy_parts
	not _anatomy_part_present(part)
}

deny contains _finding(
	"PROMOTION_DENY_CONTAINMENT_BREACHED",
	sprintf("spec.containment.%s must be false, got %s", [field, _show(object.get(_containment, field, null))]),
) if {
	some field in _containment_fields
	not _contained(field)
}

deny contains _finding(
	"PROMOTION_DENY_NO_CAPABILITIES",
	"spec.capabilities must list at least one capability",
) if {
	not _has_capabilities
}

deny contains _finding(
	"PROMOTION_DENY_UNKNOWN_ROLE_CLASS",
	sprintf("spec.role_class %s is not one of %v", [_show(_role_class), _role_classes]),
) if {
	not is_number(_temperature_limit)
}

deny contains _finding("PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT", _temperature_problem) if {
	not _temperature_within_limit
}

deny contains _finding("PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT", _budget_problem) if {
	not _budget_within_limit
}

warn contains _finding(
	"PROMOTION_WARN_BUDGET_NEAR_LIMIT",
	sprintf(
		"monthly budget %v USD is above %v of the org limit %v USD",
		[_budget, _config.budget_warn_ratio, _org_budget],
	),
) if {
	_budget_within_limit
	_budget > _config.budget_warn_ratio * _org_budget
}

warn contains _finding(
	"PROMOTION_WARN_AUTONOMOUS_AGENT",
	"agent_type is autonomous: the agent is admitted only as GOVERNED_RESTRICTED",
) if {
	input.agent.spec.agent_type == "autonomous"
}
