"""Reading Label Studio labelling configs: what the backend predicts for, and clear refusals of the rest."""

from __future__ import annotations

import pytest

from backend.studio.labelconfig import (
    ChoicesTarget,
    LabelConfigError,
    PairwiseTarget,
    classification_target,
    parse_label_config,
)

SENTIMENT = """
<View>
  <Text name="review" value="$body"/>
  <Choices name="sentiment" toName="review" choice="single">
    <Choice value="positive" hint="the author likes it"/>
    <Choice value="negative" hint="the author dislikes it"/>
    <Choice value="neutral"/>
  </Choices>
</View>
"""

# Two single-choice controls over the same text: the backend cannot guess which one to predict.
TWO_CHOICES = """
<View>
  <Text name="review" value="$body"/>
  <Choices name="sentiment" toName="review">
    <Choice value="positive"/><Choice value="negative"/>
  </Choices>
  <Choices name="topic" toName="review">
    <Choice value="price"/><Choice value="quality"/><Choice value="delivery"/>
  </Choices>
</View>
"""


def test_plain_choices_over_text_gives_names_key_labels_and_hints() -> None:
    target = classification_target(SENTIMENT)
    assert target.from_name == "sentiment"
    assert target.to_name == "review"
    assert target.value_key == "body"  # "$body" without the dollar: the key in task["data"]
    assert target.labels == ("positive", "negative", "neutral")  # config order, which the prompts keep
    # Only choices with a hint get a description; "neutral" has none and must not get an empty one.
    assert target.descriptions == {"positive": "the author likes it", "negative": "the author dislikes it"}


def test_parse_returns_the_same_target_as_classification_target() -> None:
    targets = parse_label_config(SENTIMENT)
    assert targets == [classification_target(SENTIMENT)]


def test_choice_alias_is_used_when_value_is_missing() -> None:
    xml = '<View><Text name="t" value="$text"/><Choices name="c" toName="t">' \
          '<Choice alias="yes"/><Choice value="no"/></Choices></View>'
    assert classification_target(xml).labels == ("yes", "no")


def test_multiple_choice_is_refused_naming_the_control() -> None:
    xml = SENTIMENT.replace('choice="single"', 'choice="multiple"')
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    message = str(err.value)
    assert "'sentiment'" in message
    assert "single choice" in message


def test_choices_pointing_at_a_non_text_object_is_refused() -> None:
    xml = """
    <View>
      <Image name="photo" value="$image"/>
      <Choices name="kind" toName="photo"><Choice value="cat"/><Choice value="dog"/></Choices>
    </View>
    """
    with pytest.raises(LabelConfigError) as err:
        classification_target(xml)
    message = str(err.value)
    assert "'kind'" in message and "'photo'" in message


def test_choices_with_fewer_than_two_labels_is_refused() -> None:
    xml = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="only"/></Choices></View>'
    with pytest.raises(LabelConfigError, match="fewer than two"):
        parse_label_config(xml)


def test_several_choices_are_refused_without_from_name_and_listed() -> None:
    assert [t.from_name for t in parse_label_config(TWO_CHOICES)] == ["sentiment", "topic"]
    with pytest.raises(LabelConfigError) as err:
        classification_target(TWO_CHOICES)
    message = str(err.value)
    assert "sentiment" in message and "topic" in message
    assert "HCC_FROM_NAME" in message  # the message says how to fix it


def test_from_name_picks_one_of_several_choices() -> None:
    target = classification_target(TWO_CHOICES, from_name="topic")
    assert target.from_name == "topic"
    assert target.labels == ("price", "quality", "delivery")
    assert target.value_key == "body"


def test_wrong_from_name_names_the_alternatives() -> None:
    with pytest.raises(LabelConfigError) as err:
        classification_target(TWO_CHOICES, from_name="mood")
    message = str(err.value)
    assert "'mood'" in message
    assert "sentiment" in message and "topic" in message


def test_a_usable_choices_is_kept_when_another_control_is_refused() -> None:
    # A multi-choice control next to a usable one: the usable one is the only target.
    xml = TWO_CHOICES.replace('<Choices name="topic" toName="review">',
                              '<Choices name="topic" toName="review" choice="multiple">')
    target = classification_target(xml)
    assert target.from_name == "sentiment"


def test_pairwise_over_two_texts() -> None:
    xml = """
    <View>
      <Text name="left" value="$answer_a"/>
      <Text name="right" value="$answer_b"/>
      <Pairwise name="pick" toName="left,right"/>
    </View>
    """
    targets = parse_label_config(xml)
    assert targets == [PairwiseTarget("pick", "left", "right", "answer_a", "answer_b")]
    # A comparison project has nothing to classify: classification_target must refuse, not crash.
    with pytest.raises(LabelConfigError, match="no single-choice"):
        classification_target(xml)


def test_pairwise_over_one_text_is_refused() -> None:
    xml = '<View><Text name="left" value="$a"/><Image name="img" value="$i"/>' \
          '<Pairwise name="pick" toName="left,img"/></View>'
    with pytest.raises(LabelConfigError, match="'pick'"):
        parse_label_config(xml)


def test_invalid_xml_is_refused_as_such() -> None:
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config('<View><Text name="t" value="$text"></View>')


@pytest.mark.parametrize("xml", ["", "   \n  "])
def test_empty_config_is_refused(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="no labelling config"):
        classification_target(xml)


def test_config_without_any_control_says_what_is_missing() -> None:
    with pytest.raises(LabelConfigError, match="no <Choices>"):
        parse_label_config('<View><Text name="t" value="$text"/></View>')


def test_label_config_error_is_a_value_error() -> None:
    # Callers that only know ValueError (e.g. the Flask error mapping) must still catch it.
    assert issubclass(LabelConfigError, ValueError)
    assert isinstance(classification_target(SENTIMENT), ChoicesTarget)
