# Golden expected-error cases for pipeline text, options and properties. Cases without build()
# only parse the pipeline (which also checks properties); the CHECK lines match the error message,
# so CHECK-NEXT pins the echoed pipeline line and the caret under the offending column.
# -----
# CASE: unknown-pass-did-you-mean
# RUN: graph(test-golden-optoins)
# EXPECT-ERROR: pipeline:1:7: error: 'test-golden-optoins' does not refer to a registered pass or pipeline
# EXPECT-ERROR: (did you mean 'test-golden-options'
# CHECK: pipeline:1:7: error:
# CHECK-NEXT: graph(test-golden-optoins)
# CHECK-NEXT: {{^}}        ^{{$}}
# -----
# CASE: bad-option-name
# RUN: graph(test-golden-options{cuont=3})
# EXPECT-ERROR: pipeline:1:27: error: option 'cuont' of pass 'test-golden-options': no such option (valid options: count, flag, mode, ratio, sizes) (did you mean 'count'?)
# CHECK: error:
# CHECK-NEXT: graph(test-golden-options{cuont=3})
# CHECK-NEXT: ^
# -----
# CASE: bad-option-type-int
# RUN: graph(test-golden-options{count=three})
# EXPECT-ERROR: pipeline:1:33: error: option 'count' of pass 'test-golden-options': 'three' is not a valid int (expected int)
# -----
# CASE: bad-option-type-bool
# RUN: graph(test-golden-options{flag=maybe})
# EXPECT-ERROR: option 'flag' of pass 'test-golden-options': 'maybe' is not a valid bool (true or false) (expected bool)
# -----
# CASE: bad-option-type-enum
# RUN: graph(test-golden-options{mode=c})
# EXPECT-ERROR: option 'mode' of pass 'test-golden-options': 'c' is not one of a, b (expected {a|b})
# -----
# CASE: bad-option-type-list
# RUN: graph(test-golden-options{sizes=[1,x]})
# EXPECT-ERROR: option 'sizes' of pass 'test-golden-options': 'x' is not a valid int (expected list<int>)
# -----
# CASE: bad-option-type-quoted-float
# RUN: graph(test-golden-options{ratio="x"})
# EXPECT-ERROR: a quoted string is not a valid float (expected float)
# -----
# CASE: bare-key-needs-value
# RUN: graph(test-golden-options{count})
# EXPECT-ERROR: option 'count' of pass 'test-golden-options': needs a value (bare keys are only for bool options)
# -----
# CASE: option-given-twice
# RUN: graph(test-golden-options{count=1 count=2})
# EXPECT-ERROR: pipeline:1:35: error: option 'count' of 'test-golden-options' given more than once
# -----
# CASE: option-post-init-validation
# RUN: graph(test-golden-options{count=-1})
# EXPECT-ERROR: pass 'test-golden-options': invalid options: count must be >= 0
# -----
# CASE: unbalanced-brace
# RUN: graph(test-golden-options{count=3)
# EXPECT-ERROR: pipeline:1:26: error: unbalanced '{': missing '}' before ')'
# CHECK: error:
# CHECK-NEXT: graph(test-golden-options{count=3)
# CHECK-NEXT: {{^}}                           ^{{$}}
# -----
# CASE: unbalanced-open-paren
# RUN: graph(test-golden-options
# EXPECT-ERROR: pipeline:1:6: error: unbalanced '(': missing ')'
# -----
# CASE: unbalanced-close-paren
# RUN: graph(test-golden-options))
# EXPECT-ERROR: pipeline:1:27: error: unbalanced ')': no matching '('
# -----
# CASE: unterminated-string
# RUN: graph(test-golden-options{count="3)
# EXPECT-ERROR: unterminated string: missing closing "
# -----
# CASE: empty-pipeline
# RUN: graph()
# EXPECT-ERROR: pipeline:1:6: error: empty pipeline: expected at least one pass inside graph(...)
# -----
# CASE: empty-pipeline-text
# RUN:
# EXPECT-ERROR: empty pipeline: expected at least one pass
# -----
# CASE: missing-comma
# RUN: graph(test-golden-options test-golden-options)
# EXPECT-ERROR: pipeline:1:27: error: expected ',' or ')', found 't'
# -----
# CASE: trailing-comma
# RUN: graph(test-golden-options,)
# EXPECT-ERROR: pipeline:1:27: error: expected a pass name after ','
# -----
# CASE: upper-case-name
# RUN: graph(Test)
# EXPECT-ERROR: pass names are lower-case kebab-case, found 'T'
# -----
# CASE: parameter-on-plain-pass
# RUN: graph(test-golden-options<x>)
# EXPECT-ERROR: pass 'test-golden-options' takes no <parameter>
# -----
# CASE: print-needs-analysis
# RUN: graph(print)
# EXPECT-ERROR: 'print' needs an analysis: print<NAME>
# -----
# CASE: unknown-analysis
# RUN: graph(print<test-golden-node-cuont>)
# EXPECT-ERROR: 'test-golden-node-cuont' does not refer to a registered analysis (did you mean 'test-golden-node-count'
# -----
# CASE: combinator-needs-body
# RUN: graph(fixpoint)
# EXPECT-ERROR: 'fixpoint' needs a nested pipeline: fixpoint(pass-a,pass-b)
# -----
# CASE: combinator-bad-option
# RUN: graph(fixpoint{max-iterations=0}(test-golden-options))
# EXPECT-ERROR: invalid options: max-iterations must be >= 1
# -----
# CASE: nested-body-on-plain-pass
# RUN: graph(test-golden-options(test-golden-options))
# EXPECT-ERROR: 'test-golden-options' does not take a nested pipeline (only fixpoint, repeat do)
# -----
# CASE: missing-required-property
# RUN: graph(test-golden-needs-prop)
# EXPECT-ERROR: pass 'test-golden-needs-prop' (element 0 of the pipeline) requires property 'test-golden-prop', which no earlier element establishes (add 'test-golden-makes-prop' before it
# -----
# CASE: property-established-earlier
# RUN: graph(test-golden-makes-prop,test-golden-needs-prop)
# CHECK: graph(test-golden-makes-prop,test-golden-needs-prop)
# -----
# CASE: property-assumed
# ASSUME: test-golden-prop
# RUN: graph(test-golden-needs-prop)
# CHECK: graph(test-golden-needs-prop)
# -----
# CASE: property-invalid-in-nested-body
# RUN: graph(repeat(test-golden-needs-prop),test-golden-makes-prop)
# EXPECT-ERROR: requires property 'test-golden-prop'
