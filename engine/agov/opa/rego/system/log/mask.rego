# METADATA
# title: Decision-log mask of the managed sidecar
# description: |
#   Loaded by agov's managed OPA beside the signed bundle (it is not part of
#   the bundle, so it does not change the policy hash). OPA evaluates
#   data.system.log.mask for every decision-log event and erases the JSON
#   pointers it returns; the event lists them under "erased".
#
#   A revalidation chunk carries up to a thousand full agent specs. The
#   store keeps every spec, and each proof's input_digest names its agent's
#   part of the input, so the log keeps the rest of the event (the result,
#   org, policy hash and time) and drops the specs. Encoding and compressing
#   them cost OPA about as much as judging them.
# scope: package
package system.log

# METADATA
# title: JSON pointers to erase from a decision-log event
# entrypoint: true
mask contains "/input/agents" if input.path == "agov/revalidation/results"
