# METADATA
# title: Revalidation of a chunk of governed agents
# description: |
#   Applies agov.lib.spec_rules to every agent of input.agents against
#   input.org, in one query. A missing input.org denies every agent with
#   PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT.
# scope: package
# schemas:
#   - input: schema.revalidation_input
package agov.revalidation

import data.agov.lib.spec_rules

default _org := null

_org := input.org

# METADATA
# title: Revalidation results
# description: |
#   The engine queries POST /v1/data/agov/revalidation/results and gets an
#   object agent id -> {"allow": bool, "deny": [...], "warn": [...]}.
#   An entry whose id is not a non-empty string has no result: the engine
#   must treat every id it sent and got no result for as denied. Duplicate
#   ids with different results are an evaluation error (fail closed).
# entrypoint: true
# schemas:
#   - input: schema.revalidation_input
results := _results(_org)

# An object comprehension, not a rule `results[id] := ... if`: OPA checks each
# key of a partial object rule against every key before it (quadratic in the
# chunk size). A duplicate id with a different result is a conflict error in
# both. org is an argument, so that input.org is looked up once per chunk.
_results(org) := {entry.id: {"allow": count(deny) == 0, "deny": deny, "warn": spec_rules.warn_for(agent, org)} |
	some entry in input.agents
	is_object(entry)
	is_string(entry.id)
	entry.id != ""
	agent := object.get(entry, "agent", null)
	deny := spec_rules.deny_for(agent, org)
}
