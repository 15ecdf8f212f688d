# METADATA
# title: Spec-level rules for agov agents
# description: |
#   Checks one agent spec against the org limits and the limits in
#   data.agov.config. The checks are the pure functions deny_for(agent, org)
#   and warn_for(agent, org), so that agov.revalidation can apply them to a
#   whole chunk of agents in one query; deny and warn apply them to
#   input.agent and input.org for agov.promotion. Every check is written as
#   "deny unless the good case is proven", so a missing or mistyped field is
#   a deny, never silence.
# scope: package
# schemas:
#   - input: schema.spec_rules_input
#   - input.agent: schema.agent_spec
package agov.lib.spec_rules

# How the functions are built (revalidation runs them for every agent):
#
# - _denials and _warnings are the rules: one function per check, each
#   naming every failure with its message.
# - deny_for and warn_for first try a fast path, one flat body that holds
#   only when no check has anything to say, and answer set() without building
#   a message. It reads fields with plain refs, so a missing or mistyped field
#   makes it undefined, which selects the full rules. It must never be looser
#   than them: spec_rules_test checks that both agree on every test case, and
#   a reload refuses a policy whose fast path passes an agent of the first
#   chunk of governed agents that the full rules find something about
#   (skipped_findings).
# - To add a check, write it as a `deny contains` rule over input.agent (here
#   or in agov.promotion): promotion and revalidation apply it to every agent.
#   A check added to _denials or _warnings must be added to the fast path too.
# - The full rules read fields with object.get (never undefined, never a
#   builtin error) before passing them to a function: `f(x.y)` and
#   `not f(x.y)` are undefined when x.y is missing (OPA issue 1877), and an
#   undefined deny_for would be an empty deny.

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

# 3-64 characters of letters, digits, '-' or '_', starting with a letter or digit.
_agent_id_pattern := `^[a-zA-Z0-9][a-zA-Z0-9\-_]{2,63}$`

# Required fields that no other code covers, with what each must be: a
# description, or the set of allowed values.
_required_fields := {
	"metadata.name": "a non-empty string",
	"metadata.version": "a non-empty string",
	"spec.agent_type": _agent_types,
	"spec.anatomy.reasoning.model": "a non-empty string",
	"spec.anatomy.memory.kind": _memory_kinds,
}

_valid_field(agent, "metadata.name") if _non_empty_string(agent.metadata.name)

_valid_field(agent, "metadata.version") if _non_empty_string(agent.metadata.version)

_valid_field(agent, "spec.agent_type") if agent.spec.agent_type in _agent_types

_valid_field(agent, "spec.anatomy.reasoning.model") if _non_empty_string(agent.spec.anatomy.reasoning.model)

_valid_field(agent, "spec.anatomy.memory.kind") if agent.spec.anatomy.memory.kind in _memory_kinds

default _role_classes := []

_role_classes := sort(object.keys(_config.temperature_limits))

# The temperature limit of a role class, or null. OPA caches it per role class.
default _temperature_limit(_) := null

_temperature_limit(role_class) := _config.temperature_limits[role_class]

# METADATA
# title: Deny findings for one agent spec
# description: |
#   The set of {"code", "message"} deny findings for agent against org. It is
#   defined for any two values: a missing or mistyped field, or an agent or
#   org that is null or not an object, gives findings, never an undefined
#   result.
deny_for(agent, org) := set() if { # regal ignore:rule-length
	# Fast path: the good case of every check in _denials, in its order. It
	# is one flat body because every function call and every comprehension
	# costs time for each agent of a chunk.
	agent.apiVersion == "agov/v1"
	agent.kind == "Agent"
	metadata := agent.metadata
	is_string(metadata.name)
	trim_space(metadata.name) != ""
	is_string(metadata.version)
	trim_space(metadata.version) != ""
	spec := agent.spec
	spec.agent_type in _agent_types
	anatomy := spec.anatomy
	reasoning := anatomy.reasoning
	is_string(reasoning.model)
	trim_space(reasoning.model) != ""
	memory := anatomy.memory
	memory.kind in _memory_kinds

	# _id_denials
	is_string(metadata.id)
	regex.match(_agent_id_pattern, metadata.id)

	# _anatomy_denials (x != [] and x != {} are count(x) > 0 for an array or an object)
	is_object(reasoning)
	reasoning != {}
	is_array(anatomy.inputs)
	anatomy.inputs != []
	is_array(anatomy.actions)
	anatomy.actions != []
	is_object(memory)
	memory != {}

	# _containment_denials
	spec.containment.external_calls == false
	spec.containment.persistent_writes == false

	# _capability_denials
	is_array(spec.capabilities)
	spec.capabilities != []

	# _role_denials, _temperature_denials
	limit := _temperature_limit(spec.role_class)
	is_number(limit)
	temperature := reasoning.temperature
	is_number(temperature)
	temperature >= 0
	temperature <= limit

	# _budget_denials
	budget := spec.economics.monthly_budget_usd
	is_number(budget)
	budget >= 0
	org_budget := org.max_monthly_budget_usd
	is_number(org_budget)
	budget <= org_budget
} else := _denials(agent, org)

# METADATA
# title: Warn findings for one agent spec
# description: |
#   The set of {"code", "message"} warn findings for agent against org,
#   defined for any two values.
warn_for(agent, org) := set() if {
	# Fast path: neither warning applies.
	agent.spec.agent_type != "autonomous"
	budget := agent.spec.economics.monthly_budget_usd
	is_number(budget)
	budget <= _budget_warn_threshold(org)
} else := _warnings(agent, org)

# The budget above which an agent is warned about, or undefined. It depends on
# org only, so OPA computes it once per chunk and caches it.
_budget_warn_threshold(org) := _config.budget_warn_ratio * org.max_monthly_budget_usd if {
	is_number(_config.budget_warn_ratio)
	is_number(org.max_monthly_budget_usd)
}

# METADATA
# title: Findings the fast paths skip
# description: |
#   The findings of the full rules (_denials, _warnings) for agent and org
#   that deny_for and warn_for do not give. It is empty unless a check was
#   added to a full rule, or made stricter there, and not to the fast path:
#   that check then never runs for an agent that passes the fast path, in a
#   promotion or a revalidation. A reload refuses a policy for which it is not
#   empty on an agent of the first chunk of governed agents
#   (agov.revalidation.trial_failures).
skipped_findings(agent, org) := skipped_denials | skipped_warnings if {
	skipped_denials := _denials(agent, org) - deny_for(agent, org)
	skipped_warnings := _warnings(agent, org) - warn_for(agent, org)
}

# The rules over input, for agov.promotion. A missing input.agent or input.org
# is null, so the functions still run (and deny).
default _agent := null

_agent := input.agent

default _org := null

_org := input.org

deny contains finding if some finding in _deny_for_input

# deny_for is defined for any input; should a change ever break that, a
# promotion must still see a deny, not an empty set. A default, not a second
# call of deny_for: revalidation asks this for every agent.
default _deny_for_input := {{
	"code": "PROMOTION_DENY_INPUT_INVALID",
	"message": "the spec rules gave no result for input.agent",
}}

_deny_for_input := deny_for(_agent, _org)

warn contains finding if some finding in warn_for(_agent, _org)

# The full rules.

_denials(agent, org) := union({
	_input_denials(agent),
	_id_denials(object.get(doc, ["agent", "metadata", "id"], null)),
	_anatomy_denials(object.get(doc, ["agent", "spec", "anatomy"], null)),
	_containment_denials(object.get(doc, ["agent", "spec", "containment"], null)),
	_capability_denials(object.get(doc, ["agent", "spec", "capabilities"], null)),
	_role_denials(role_class, limit),
	_temperature_denials(temperature, role_class, limit),
	_budget_denials(budget, object.get(doc, ["org", "max_monthly_budget_usd"], null)),
}) if {
	# agent and org wrapped in an object, so that object.get reads through
	# values of any type: object.get(doc, path, null) is null when any step
	# of path is missing or not an object.
	doc := {"agent": agent, "org": org}
	role_class := object.get(doc, ["agent", "spec", "role_class"], null)
	limit := _temperature_limit(role_class)
	temperature := object.get(doc, ["agent", "spec", "anatomy", "reasoning", "temperature"], null)
	budget := object.get(doc, ["agent", "spec", "economics", "monthly_budget_usd"], null)
}

_warnings(agent, org) := _budget_warnings(
	object.get(doc, ["agent", "spec", "economics", "monthly_budget_usd"], null),
	object.get(doc, ["org", "max_monthly_budget_usd"], null),
) | _autonomy_warnings(object.get(doc, ["agent", "spec", "agent_type"], null)) if {
	doc := {"agent": agent, "org": org}
}

# _get is the value at path in doc, or null: never undefined, and never a
# builtin error, whatever the type of doc or of any value on the path.
_get(doc, path) := object.get(doc, path, null) if {
	is_object(doc)
} else := null

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

# value is a number >= 0, and limit is a number that value does not exceed.
_within(value, limit) if {
	_non_negative_number(value)
	is_number(limit)
	value <= limit
}

_input_denials(agent) := set() if {
	agent.apiVersion == "agov/v1"
	agent.kind == "Agent"
	_valid_field(agent, "metadata.name")
	_valid_field(agent, "metadata.version")
	_valid_field(agent, "spec.agent_type")
	_valid_field(agent, "spec.anatomy.reasoning.model")
	_valid_field(agent, "spec.anatomy.memory.kind")
} else := {_finding("PROMOTION_DENY_INPUT_INVALID", "input.agent is missing or not an object")} if {
	not is_object(agent)
} else := {finding |
	some [field, want] in [["apiVersion", "agov/v1"], ["kind", "Agent"]]
	value := object.get(agent, field, null)
	value != want
	finding := _finding("PROMOTION_DENY_INPUT_INVALID", sprintf("%s is %s, want %s", [field, _show(value), _show(want)]))
} | {finding |
	some field, want in _required_fields
	not _valid_field(agent, field)
	finding := _finding("PROMOTION_DENY_INPUT_INVALID", sprintf("%s must be %s", [field, _describe(want)]))
}

_id_denials(id) := set() if {
	is_string(id)
	regex.match(_agent_id_pattern, id)
} else := {_finding(
	"PROMOTION_DENY_INVALID_AGENT_ID",
	sprintf(
		"metadata.id %s must be 3-64 characters of letters, digits, '-' or '_', starting with a letter or digit",
		[_show(id)],
	),
)}

_anatomy_part_present(anatomy, part, kind) if {
	value := anatomy[part]
	type_name(value) == kind
	count(value) > 0
}

_anatomy_denials(anatomy) := set() if {
	_anatomy_part_present(anatomy, "reasoning", "object")
	_anatomy_part_present(anatomy, "inputs", "array")
	_anatomy_part_present(anatomy, "actions", "array")
	_anatomy_part_present(anatomy, "memory", "object")
} else := {finding |
	some part, kind in _anatomy_parts
	not _anatomy_part_present(anatomy, part, kind)
	finding := _finding(
		"PROMOTION_DENY_ANATOMY_INCOMPLETE",
		sprintf("spec.anatomy.%s is missing or empty: it must be a non-empty %s", [part, kind]),
	)
}

_containment_denials(containment) := set() if {
	containment.external_calls == false
	containment.persistent_writes == false
} else := {finding |
	some field in _containment_fields
	value := _get(containment, [field])
	value != false
	finding := _finding(
		"PROMOTION_DENY_CONTAINMENT_BREACHED",
		sprintf("spec.containment.%s must be false, got %s", [field, _show(value)]),
	)
}

_capability_denials(capabilities) := set() if {
	is_array(capabilities)
	count(capabilities) > 0
} else := {_finding("PROMOTION_DENY_NO_CAPABILITIES", "spec.capabilities must list at least one capability")}

_role_denials(role_class, limit) := set() if {
	is_number(limit)
} else := {_finding(
	"PROMOTION_DENY_UNKNOWN_ROLE_CLASS",
	sprintf("spec.role_class %s is not one of %v", [_show(role_class), _role_classes]),
)}

_temperature_denials(temperature, role_class, limit) := set() if {
	_within(temperature, limit)
} else := {_finding(
	"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
	sprintf("spec.anatomy.reasoning.temperature is %s, want a number >= 0", [_show(temperature)]),
)} if {
	not _non_negative_number(temperature)
} else := {_finding(
	"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
	sprintf("temperature %v cannot be checked: role_class %s has no temperature limit", [temperature, _show(role_class)]),
)} if {
	not is_number(limit)
} else := {_finding(
	"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
	sprintf("temperature %v exceeds the %v limit %v", [temperature, role_class, limit]),
)}

_budget_denials(budget, org_budget) := set() if {
	_within(budget, org_budget)
} else := {_finding(
	"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	sprintf("spec.economics.monthly_budget_usd is %s, want a number >= 0", [_show(budget)]),
)} if {
	not _non_negative_number(budget)
} else := {_finding(
	"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	sprintf(
		"monthly budget %v USD cannot be checked: input.org.max_monthly_budget_usd is %s, want a number",
		[budget, _show(org_budget)],
	),
)} if {
	not is_number(org_budget)
} else := {_finding(
	"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	sprintf("monthly budget %v USD exceeds the org limit %v USD", [budget, org_budget]),
)}

_budget_warnings(budget, org_budget) := {_finding(
	"PROMOTION_WARN_BUDGET_NEAR_LIMIT",
	sprintf(
		"monthly budget %v USD is above %v of the org limit %v USD",
		[budget, _config.budget_warn_ratio, org_budget],
	),
)} if {
	_within(budget, org_budget)
	budget > _config.budget_warn_ratio * org_budget
} else := set()

_autonomy_warnings(agent_type) := {_finding(
	"PROMOTION_WARN_AUTONOMOUS_AGENT",
	"agent_type is autonomous: the agent is admitted only as GOVERNED_RESTRICTED",
)} if {
	agent_type == "autonomous"
} else := set()
