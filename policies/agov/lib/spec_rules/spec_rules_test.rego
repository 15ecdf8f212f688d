package agov.lib.spec_rules_test

import data.agov.lib.spec_rules

# The limits the tests are written against: those of the shipped data.json. Tests that depend on
# a limit evaluate with `with data.agov.config as config`, so that a workspace can change its own
# limits without editing them; test_limits_come_from_data shows that the rules read data.
config := {
	"temperature_limits": {"compliance": 0.3, "analysis": 0.7, "ideation": 1.0},
	"promotion_roles": ["agent_admin", "policy_admin"],
	"budget_warn_ratio": 0.8,
}

# A spec that passes every rule; the other test packages import it too.
agent := {
	"apiVersion": "agov/v1",
	"kind": "Agent",
	"metadata": {
		"id": "finance-reconciler-prod",
		"name": "Finance Reconciler",
		"workspace": "finance",
		"version": "1.0.0",
		"owner": "finance@example.com",
		"tags": ["finance"],
	},
	"spec": {
		"agent_type": "supervised",
		"role_class": "compliance",
		"anatomy": {
			"reasoning": {"model": "some-model", "temperature": 0.2},
			"inputs": [{"name": "ledger", "classification": "internal"}],
			"actions": [{"type": "database.query", "resource": "postgresql"}],
			"memory": {"kind": "none"},
		},
		"capabilities": ["database.query", "api.read"],
		"containment": {"external_calls": false, "persistent_writes": false},
		"economics": {"monthly_budget_usd": 200},
	},
}

org := {"max_monthly_budget_usd": 1000}

valid_input := {"agent": agent, "org": org}

all_deny_codes := {
	"PROMOTION_DENY_INVALID_AGENT_ID",
	"PROMOTION_DENY_ANATOMY_INCOMPLETE",
	"PROMOTION_DENY_CONTAINMENT_BREACHED",
	"PROMOTION_DENY_NO_CAPABILITIES",
	"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
	"PROMOTION_DENY_UNKNOWN_ROLE_CLASS",
	"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
	"PROMOTION_DENY_INPUT_INVALID",
}

all_warn_codes := {"PROMOTION_WARN_BUDGET_NEAR_LIMIT", "PROMOTION_WARN_AUTONOMOUS_AGENT"}

# put sets the value at a JSON pointer of valid_input.
put(path, value) := json.patch(valid_input, [{"op": "add", "path": path, "value": value}])

drop(path) := json.remove(valid_input, [path])

temperature := "/agent/spec/anatomy/reasoning/temperature"

budget := "/agent/spec/economics/monthly_budget_usd"

# Each case: the input and the exact sets of deny and warn codes it must give.
cases := {
	"valid": {"input": valid_input, "deny": set(), "warn": set()},
	"temperature at the compliance limit": {"input": put(temperature, 0.3), "deny": set(), "warn": set()},
	"temperature over the compliance limit": {
		"input": put(temperature, 0.31),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"temperature over the analysis limit": {
		"input": json.patch(valid_input, [
			{"op": "replace", "path": "/agent/spec/role_class", "value": "analysis"},
			{"op": "replace", "path": temperature, "value": 0.9},
		]),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"temperature within the ideation limit": {
		"input": json.patch(valid_input, [
			{"op": "replace", "path": "/agent/spec/role_class", "value": "ideation"},
			{"op": "replace", "path": temperature, "value": 1},
		]),
		"deny": set(), "warn": set(),
	},
	"temperature missing": {
		"input": drop(temperature),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"temperature a string": {
		"input": put(temperature, "0.2"),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"temperature negative": {
		"input": put(temperature, -0.1),
		"deny": {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"role_class unknown": {
		"input": put("/agent/spec/role_class", "wizard"),
		"deny": {"PROMOTION_DENY_UNKNOWN_ROLE_CLASS", "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"role_class missing": {
		"input": drop("/agent/spec/role_class"),
		"deny": {"PROMOTION_DENY_UNKNOWN_ROLE_CLASS", "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"role_class not a string": {
		"input": put("/agent/spec/role_class", ["compliance"]),
		"deny": {"PROMOTION_DENY_UNKNOWN_ROLE_CLASS", "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"id too short": {
		"input": put("/agent/metadata/id", "ab"),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id at the minimum length": {"input": put("/agent/metadata/id", "abc"), "deny": set(), "warn": set()},
	"id at the maximum length": {
		"input": put("/agent/metadata/id", concat("", ["a" | some _ in numbers.range(1, 64)])),
		"deny": set(), "warn": set(),
	},
	"id too long": {
		"input": put("/agent/metadata/id", concat("", ["a" | some _ in numbers.range(1, 65)])),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id starts with a dash": {
		"input": put("/agent/metadata/id", "-abc"),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id with a space": {
		"input": put("/agent/metadata/id", "ab c"),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id with a newline after it": {
		"input": put("/agent/metadata/id", "abc\n"),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id a number": {
		"input": put("/agent/metadata/id", 12345),
		"deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set(),
	},
	"id missing": {"input": drop("/agent/metadata/id"), "deny": {"PROMOTION_DENY_INVALID_AGENT_ID"}, "warn": set()},
	"inputs empty": {
		"input": put("/agent/spec/anatomy/inputs", []),
		"deny": {"PROMOTION_DENY_ANATOMY_INCOMPLETE"}, "warn": set(),
	},
	"inputs an object": {
		"input": put("/agent/spec/anatomy/inputs", {"name": "x"}),
		"deny": {"PROMOTION_DENY_ANATOMY_INCOMPLETE"}, "warn": set(),
	},
	"actions missing": {
		"input": drop("/agent/spec/anatomy/actions"),
		"deny": {"PROMOTION_DENY_ANATOMY_INCOMPLETE"}, "warn": set(),
	},
	"memory empty": {
		"input": put("/agent/spec/anatomy/memory", {}),
		"deny": {"PROMOTION_DENY_ANATOMY_INCOMPLETE", "PROMOTION_DENY_INPUT_INVALID"}, "warn": set(),
	},
	"reasoning empty": {
		"input": put("/agent/spec/anatomy/reasoning", {}),
		"deny": {
			"PROMOTION_DENY_ANATOMY_INCOMPLETE",
			"PROMOTION_DENY_INPUT_INVALID",
			"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
		},
		"warn": set(),
	},
	"external calls allowed": {
		"input": put("/agent/spec/containment/external_calls", true),
		"deny": {"PROMOTION_DENY_CONTAINMENT_BREACHED"}, "warn": set(),
	},
	"persistent writes as a string": {
		"input": put("/agent/spec/containment/persistent_writes", "false"),
		"deny": {"PROMOTION_DENY_CONTAINMENT_BREACHED"}, "warn": set(),
	},
	"persistent writes as 0": {
		"input": put("/agent/spec/containment/persistent_writes", 0),
		"deny": {"PROMOTION_DENY_CONTAINMENT_BREACHED"}, "warn": set(),
	},
	"containment missing": {
		"input": drop("/agent/spec/containment"),
		"deny": {"PROMOTION_DENY_CONTAINMENT_BREACHED"}, "warn": set(),
	},
	"containment a list": {
		"input": put("/agent/spec/containment", [false, false]),
		"deny": {"PROMOTION_DENY_CONTAINMENT_BREACHED"}, "warn": set(),
	},
	"capabilities empty": {
		"input": put("/agent/spec/capabilities", []),
		"deny": {"PROMOTION_DENY_NO_CAPABILITIES"}, "warn": set(),
	},
	"capabilities a string": {
		"input": put("/agent/spec/capabilities", "api.read"),
		"deny": {"PROMOTION_DENY_NO_CAPABILITIES"}, "warn": set(),
	},
	"budget over the org limit": {
		"input": put(budget, 1000.01),
		"deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"budget at the org limit": {
		"input": put(budget, 1000),
		"deny": set(), "warn": {"PROMOTION_WARN_BUDGET_NEAR_LIMIT"},
	},
	"budget just over the warn ratio": {
		"input": put(budget, 801),
		"deny": set(), "warn": {"PROMOTION_WARN_BUDGET_NEAR_LIMIT"},
	},
	"budget at the warn ratio": {"input": put(budget, 800), "deny": set(), "warn": set()},
	"budget negative": {"input": put(budget, -1), "deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"}, "warn": set()},
	"budget a string": {"input": put(budget, "200"), "deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"}, "warn": set()},
	"org missing": {"input": drop("/org"), "deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"}, "warn": set()},
	"org limit a string": {
		"input": put("/org/max_monthly_budget_usd", "1000"),
		"deny": {"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"}, "warn": set(),
	},
	"autonomous agent": {
		"input": put("/agent/spec/agent_type", "autonomous"),
		"deny": set(), "warn": {"PROMOTION_WARN_AUTONOMOUS_AGENT"},
	},
	"agent_type unknown": {
		"input": put("/agent/spec/agent_type", "rogue"),
		"deny": {"PROMOTION_DENY_INPUT_INVALID"}, "warn": set(),
	},
	"apiVersion wrong": {
		"input": put("/agent/apiVersion", "agov/v2"),
		"deny": {"PROMOTION_DENY_INPUT_INVALID"}, "warn": set(),
	},
	"kind wrong": {"input": put("/agent/kind", "Pod"), "deny": {"PROMOTION_DENY_INPUT_INVALID"}, "warn": set()},
	"model blank": {
		"input": put("/agent/spec/anatomy/reasoning/model", " "),
		"deny": {"PROMOTION_DENY_INPUT_INVALID"}, "warn": set(),
	},
	"memory kind unknown": {
		"input": put("/agent/spec/anatomy/memory/kind", "forever"),
		"deny": {"PROMOTION_DENY_INPUT_INVALID"}, "warn": set(),
	},
	"agent not an object": {
		"input": put("/agent", "finance-reconciler-prod"),
		"deny": all_deny_codes, "warn": set(),
	},
	"no input at all": {"input": {}, "deny": all_deny_codes, "warn": set()},
}

# Tables use `every`: with `some`, a test passes when any one case passes.
test_cases if {
	every name, case in cases {
		denies := {d.code | some d in spec_rules.deny with input as case.input with data.agov.config as config}
		warnings := {w.code | some w in spec_rules.warn with input as case.input with data.agov.config as config}
		print_on_failure(name, "deny", denies, case.deny)
		print_on_failure(name, "warn", warnings, case.warn)
	}
}

# print_on_failure is got == want, and prints the failing case (opa test -v).
print_on_failure(name, what, got, want) if {
	got == want
} else := false if {
	print(name, what, "got", got, "want", want)
}

test_every_code_is_covered if {
	{code | some case in cases; some code in case.deny} == all_deny_codes
	{code | some case in cases; some code in case.warn} == all_warn_codes
}

messages := {
	"temperature over the analysis limit": {
		"input": cases["temperature over the analysis limit"].input,
		"message": "temperature 0.9 exceeds the analysis limit 0.7",
	},
	"temperature missing": {
		"input": drop(temperature),
		"message": "spec.anatomy.reasoning.temperature is null, want a number >= 0",
	},
	"role_class unknown": {
		"input": put("/agent/spec/role_class", "wizard"),
		"message": `spec.role_class "wizard" is not one of ["analysis", "compliance", "ideation"]`,
	},
	"temperature with an unknown role_class": {
		"input": put("/agent/spec/role_class", "wizard"),
		"message": `temperature 0.2 cannot be checked: role_class "wizard" has no temperature limit`,
	},
	"budget over the org limit": {
		"input": put(budget, 1500),
		"message": "monthly budget 1500 USD exceeds the org limit 1000 USD",
	},
	"org missing": {
		"input": drop("/org"),
		"message": "monthly budget 200 USD cannot be checked: input.org.max_monthly_budget_usd is null, want a number",
	},
	"budget near the limit": {
		"input": put(budget, 900),
		"message": "monthly budget 900 USD is above 0.8 of the org limit 1000 USD",
	},
	"containment": {
		"input": put("/agent/spec/containment/external_calls", true),
		"message": "spec.containment.external_calls must be false, got true",
	},
	"anatomy": {
		"input": drop("/agent/spec/anatomy/memory"),
		"message": "spec.anatomy.memory is missing or empty: it must be a non-empty object",
	},
	"agent id": {
		"input": put("/agent/metadata/id", "-x"),
		"message": `metadata.id "-x" must be 3-64 characters of letters, digits, '-' or '_', starting with a letter or digit`,
	},
	"apiVersion": {"input": drop("/agent/apiVersion"), "message": `apiVersion is null, want "agov/v1"`},
	"kind": {"input": put("/agent/kind", "Pod"), "message": `kind is "Pod", want "Agent"`},
	"required field": {
		"input": drop("/agent/metadata/version"),
		"message": "metadata.version must be a non-empty string",
	},
	"agent type": {
		"input": drop("/agent/spec/agent_type"),
		"message": `spec.agent_type must be one of ["advisory", "autonomous", "custom", "mcp_server", "supervised"]`,
	},
}

test_messages if {
	every name, case in messages {
		found := {f.message |
			some f in (spec_rules.deny | spec_rules.warn) with input as case.input with data.agov.config as config
		}
		print_on_failure(name, "message", case.message in found, true)
	}
}

# The limits are data: a user edits data.json and the rule follows.
test_limits_come_from_data if {
	spec_rules.deny == set() with input as put(temperature, 0.5)
		with data.agov.config as config
		with data.agov.config.temperature_limits as {"compliance": 0.5}
	count(spec_rules.deny) > 0 with input as put(temperature, 0.5) with data.agov.config as config
}

test_warn_ratio_comes_from_data if {
	spec_rules.warn == set() with input as put(budget, 900)
		with data.agov.config as config
		with data.agov.config.budget_warn_ratio as 0.95
}

# Without its configuration the policy denies rather than guessing limits.
test_missing_config_denies if {
	codes := {d.code | some d in spec_rules.deny with input as valid_input with data.agov.config as {}}
	codes == {"PROMOTION_DENY_UNKNOWN_ROLE_CLASS", "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}
}

# undefined_for is undefined for an agent without an `undefined` field, as a
# broken deny_for would be.
undefined_for(agent, org) := {"agent": agent.undefined, "org": org}

test_an_undefined_deny_for_still_denies if {
	denies := spec_rules.deny with input as valid_input with spec_rules.deny_for as undefined_for
	denies == {{
		"code": "PROMOTION_DENY_INPUT_INVALID",
		"message": "the spec rules gave no result for input.agent",
	}}
}
