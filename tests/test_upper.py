"""The receiver's own upper layer (dicom/upper.py) against pynetdicom's encoders and decoders."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.sop_class import MRImageStorage, Verification

from mriqa_node.dicom import upper
from tests.fuzz import recorded_request

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def test_a_pynetdicom_association_request_is_read_and_answered_in_its_terms() -> None:
    raw = recorded_request("SCANNER1")
    pdu_type, length = upper.PDU_HEADER.unpack_from(raw)
    assert pdu_type == upper.ASSOCIATE_RQ and length == len(raw) - 6
    request = upper.parse_associate_rq(raw[6:])
    assert (request.calling_ae, request.called_ae) == ("SCANNER1", "MRIQA")
    assert request.application_context == upper.APPLICATION_CONTEXT
    assert [c.abstract_syntax for c in request.contexts] == [Verification, MRImageStorage]
    assert EXPLICIT_LE in request.contexts[1].transfer_syntaxes
    assert request.max_pdu == 16382  # pynetdicom's default
    ids = [c.id for c in request.contexts]

    results = {ids[0]: (upper.ACCEPTANCE, "1.2.840.10008.1.2"),
               ids[1]: (upper.TRANSFER_SYNTAXES_NOT_SUPPORTED, EXPLICIT_LE)}  # fmt: skip
    ac = A_ASSOCIATE_AC()
    ac.decode(upper.encode_associate_ac(request, results, 65536))
    assert (ac.calling_ae_title, ac.called_ae_title) == ("SCANNER1", "MRIQA")
    got = {c.context_id: (c.result, c.transfer_syntax) for c in ac.presentation_context}
    assert got == results
    assert ac.user_information.maximum_length == 65536

    rj = A_ASSOCIATE_RJ()
    rj.decode(upper.encode_associate_rj(*upper.CALLING_AE_NOT_RECOGNISED))
    assert (rj.result, rj.source, rj.reason_diagnostic) == upper.CALLING_AE_NOT_RECOGNISED


@pytest.mark.parametrize("cut", [10, 67, 75, 100])
def test_a_broken_association_request_is_a_protocol_error(cut: int) -> None:
    body = bytearray(recorded_request()[6:])
    with pytest.raises(upper.ProtocolError):
        upper.parse_associate_rq(body[:cut])  # too short, or an item past the end
    body[68 + 2 : 68 + 4] = b"\xff\xff"  # the application context item's length
    with pytest.raises(upper.ProtocolError, match="runs past the end"):
        upper.parse_associate_rq(body)


def test_a_command_set_round_trips_with_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = MRImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = upper.parse_command(encode(message.command_set, True, True))
    assert command.kind == upper.C_STORE_RQ and command.message_id == 7 and command.has_dataset
    assert (command.sop_class_uid, command.sop_instance_uid) == (MRImageStorage, "1.2.3.4.5")

    response = decode(BytesIO(upper.encode_response(command, 0xA700)), True, True)
    assert response.CommandField == upper.C_STORE_RSP
    assert response.MessageIDBeingRespondedTo == 7 and response.Status == 0xA700
    assert response.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert response.CommandDataSetType == upper.NO_DATASET
    raw = upper.encode_response(command, 0)
    assert struct.unpack_from("<L", raw, 8)[0] == len(raw) - 12  # the command group length
    with pytest.raises(upper.ProtocolError):
        upper.parse_command(raw[:-3])


@pytest.mark.parametrize("max_pdu", [0, 20, 31, 1000])
def test_data_is_fragmented_to_the_peers_largest_pdu(max_pdu: int) -> None:
    data = bytes(range(40))
    raw, pdus = upper.encode_pdata(3, True, data, max_pdu), []
    while raw:
        pdu_type, length = upper.PDU_HEADER.unpack_from(raw)
        assert pdu_type == upper.P_DATA_TF and (max_pdu == 0 or 6 + length <= max_pdu)
        pdus.append(raw[6 : 6 + length])
        raw = raw[6 + length :]
    fragments = [pdv for body in pdus for pdv in upper.iter_pdvs(memoryview(body))]
    assert b"".join(bytes(f[3]) for f in fragments) == data
    assert [f[2] for f in fragments] == [False] * (len(fragments) - 1) + [True]
    assert all(cid == 3 and command for cid, command, _, _ in fragments)
    with pytest.raises(upper.ProtocolError, match="does not fit"):
        list(upper.iter_pdvs(memoryview(pdus[0][:-1])))


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_send(tmp_path, model_dir) -> None:
    """pynetdicom's reactor thread can take a fast peer's response (dicom/client.py): it is
    put back for the send waiting for it, not dropped; requests are still served as before."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_ECHO

    from mriqa_node.dicom.client import association
    from tests.test_failures import start_node

    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir)
    try:
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(Verification)
        with association(ae, "127.0.0.1", node.settings.dicom.port, "MRIQA") as assoc:
            response = C_ECHO()
            response.MessageIDBeingRespondedTo, response.Status = 1, 0
            assoc._serve_request(response, 1)  # as the reactor does with what it takes
            assert assoc.dimse.get_msg(block=False) == (1, response)
            assert assoc.send_c_echo().Status == 0
    finally:
        node.stop()


def test_a_message_buffer_gives_each_message_its_own_bytes() -> None:
    buffer = upper.MessageBuffer()
    first = [bytes([i]) * 300_000 for i in range(1, 9)]  # 2.4 MB: grows past its first MiB
    buffer.start(b"meta")
    for fragment in first:
        buffer.add(memoryview(fragment))
    assert buffer.size == 4 + 2_400_000
    assert buffer.take() == b"meta" + b"".join(first)
    buffer.start(b"m2")  # the next message reuses the buffer and sees none of the first
    buffer.add(b"xy")
    assert buffer.take() == b"m2xy"
